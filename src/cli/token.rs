//! `candela token create`: sign a JWT with the server's key (same data directory, zero config).

use std::path::PathBuf;

use super::CommonArgs;
use crate::auth::{self, SigningKey};

#[derive(clap::Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a new bearer token.
    Create(CreateArgs),
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The user the token belongs to (`sub`).
    #[arg(long)]
    pub sub: String,
    /// Scopes, space- or comma-separated: images:generate, jobs:read, admin.
    #[arg(long, default_value = "images:generate jobs:read")]
    pub scope: Vec<String>,
    /// Lifetime: 30d, 12h, 15m, 3600s.
    #[arg(long, default_value = "30d", value_parser = auth::parse_ttl)]
    pub ttl: u64,
    #[arg(long, env = "CANDELA_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// Sign with this PEM private key (RS256/EdDSA) instead of the HS256 secret.
    #[arg(long)]
    pub private_key: Option<PathBuf>,
    #[arg(long, env = "CANDELA_JWT_ALGORITHM")]
    pub algorithm: Option<String>,
    #[arg(long, env = "CANDELA_JWT_ISSUER")]
    pub issuer: Option<String>,
    #[arg(long, env = "CANDELA_JWT_AUDIENCE")]
    pub audience: Option<String>,
}

pub fn run(common: &CommonArgs, cmd: TokenCommand) -> anyhow::Result<()> {
    let TokenCommand::Create(args) = cmd;
    let key = match &args.private_key {
        Some(pem) => SigningKey::from_private_pem(pem, args.algorithm.as_deref())?,
        None => {
            let path = args
                .jwt_secret_file
                .clone()
                .unwrap_or_else(|| auth::default_secret_path(&common.data_dir));
            SigningKey::hs256(&auth::load_or_create_secret(&path)?)
        }
    };
    let scopes: Vec<String> = args
        .scope
        .iter()
        .flat_map(|s| s.split([' ', ',']))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let token = auth::create_token(
        &key,
        &args.sub,
        &scopes,
        args.ttl,
        args.issuer.as_deref(),
        args.audience.as_deref(),
    )?;
    println!("{token}");
    Ok(())
}
