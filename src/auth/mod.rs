//! JWT bearer authentication (the OpenAI SDK's "api key" is the token). HS256 with a secret
//! (created in the data directory on first start when nothing is configured), or RS256/EdDSA
//! with a public key. `exp` is required; `iss`/`aud` are checked when configured.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub const SCOPE_GENERATE: &str = "images:generate";
pub const SCOPE_JOBS_READ: &str = "jobs:read";
pub const SCOPE_ADMIN: &str = "admin";
pub const ALL_SCOPES: &[&str] = &[SCOPE_GENERATE, SCOPE_JOBS_READ, SCOPE_ADMIN];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Space-separated scopes (RFC 8693 `scope`).
    #[serde(default)]
    pub scope: String,
}

/// Who is calling, after verification.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: String,
    pub scopes: HashSet<String>,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.scopes.contains(SCOPE_ADMIN)
    }

    pub fn has(&self, scope: &str) -> bool {
        self.is_admin() || self.scopes.contains(scope)
    }

    /// The user filter for queries: `None` (everything) for admins.
    pub fn visible_user(&self) -> Option<&str> {
        if self.is_admin() {
            None
        } else {
            Some(&self.user)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "missing bearer token: send `Authorization: Bearer <token>` (the OpenAI SDK's api_key)"
    )]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("this token lacks the `{0}` scope")]
    MissingScope(&'static str),
    #[error("key setup: {0}")]
    Setup(String),
}

/// How tokens are verified (and, for HS256, signed).
#[derive(Clone)]
pub struct Verifier {
    decoding: DecodingKey,
    validation: Validation,
}

#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// HS256 secret file; default `<data_dir>/jwt_secret`, created when missing.
    pub secret_file: Option<PathBuf>,
    /// PEM public key: switches to RS256 or EdDSA (by `algorithm`).
    pub public_key: Option<PathBuf>,
    pub algorithm: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

pub fn default_secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join("jwt_secret")
}

/// Read the HS256 secret, creating a random one (mode 0600) on first use.
pub fn load_or_create_secret(path: &Path) -> Result<Vec<u8>, AuthError> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let text = text.trim();
        if text.len() < 32 {
            return Err(AuthError::Setup(format!(
                "{} holds fewer than 32 characters",
                path.display()
            )));
        }
        return Ok(text.as_bytes().to_vec());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| AuthError::Setup(format!("{}: {e}", dir.display())))?;
    }
    let bytes: [u8; 32] = rand::random();
    let secret = hex::encode(bytes);
    write_private(path, secret.as_bytes())
        .map_err(|e| AuthError::Setup(format!("{}: {e}", path.display())))?;
    tracing::info!(path = %path.display(), "created a new JWT signing secret");
    Ok(secret.into_bytes())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(bytes)
}

fn algorithm(name: Option<&str>, default: Algorithm) -> Result<Algorithm, AuthError> {
    match name {
        None => Ok(default),
        Some("HS256") => Ok(Algorithm::HS256),
        Some("RS256") => Ok(Algorithm::RS256),
        Some("EdDSA") => Ok(Algorithm::EdDSA),
        Some(other) => Err(AuthError::Setup(format!(
            "unsupported JWT algorithm `{other}` (HS256, RS256, EdDSA)"
        ))),
    }
}

impl Verifier {
    pub fn new(settings: &AuthSettings, data_dir: &Path) -> Result<Self, AuthError> {
        let (decoding, alg) = match &settings.public_key {
            Some(pem_path) => {
                let pem = std::fs::read(pem_path)
                    .map_err(|e| AuthError::Setup(format!("{}: {e}", pem_path.display())))?;
                let alg = algorithm(settings.algorithm.as_deref(), Algorithm::RS256)?;
                let key = match alg {
                    Algorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                    _ => {
                        return Err(AuthError::Setup(
                            "a public key needs algorithm RS256 or EdDSA".into(),
                        ))
                    }
                }
                .map_err(|e| AuthError::Setup(format!("{}: {e}", pem_path.display())))?;
                (key, alg)
            }
            None => {
                let path = settings
                    .secret_file
                    .clone()
                    .unwrap_or_else(|| default_secret_path(data_dir));
                (
                    DecodingKey::from_secret(&load_or_create_secret(&path)?),
                    Algorithm::HS256,
                )
            }
        };
        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 30;
        match &settings.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &settings.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(Self {
            decoding,
            validation,
        })
    }

    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let data =
            decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                        AuthError::Invalid("signature does not verify".into())
                    }
                    jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(c) => {
                        AuthError::Invalid(format!("missing `{c}` claim"))
                    }
                    _ => AuthError::Invalid(e.to_string()),
                }
            })?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err(AuthError::Invalid("empty `sub` claim".into()));
        }
        Ok(Principal {
            user: claims.sub,
            scopes: claims
                .scope
                .split_whitespace()
                .map(str::to_string)
                .collect(),
        })
    }
}

/// Sign a token: HS256 with the secret, or RS256/EdDSA with a private PEM key.
pub fn create_token(
    key: &SigningKey,
    sub: &str,
    scopes: &[String],
    ttl_secs: u64,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<String, AuthError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for s in scopes {
        if !ALL_SCOPES.contains(&s.as_str()) {
            return Err(AuthError::Setup(format!(
                "unknown scope `{s}`; known: {}",
                ALL_SCOPES.join(", ")
            )));
        }
    }
    let claims = Claims {
        sub: sub.to_string(),
        exp: now + ttl_secs,
        iat: Some(now),
        iss: issuer.map(str::to_string),
        aud: audience.map(str::to_string),
        scope: scopes.join(" "),
    };
    encode(&Header::new(key.algorithm), &claims, &key.key)
        .map_err(|e| AuthError::Setup(e.to_string()))
}

pub struct SigningKey {
    pub algorithm: Algorithm,
    pub key: EncodingKey,
}

impl SigningKey {
    pub fn hs256(secret: &[u8]) -> Self {
        Self {
            algorithm: Algorithm::HS256,
            key: EncodingKey::from_secret(secret),
        }
    }

    pub fn from_private_pem(path: &Path, algorithm_name: Option<&str>) -> Result<Self, AuthError> {
        let pem = std::fs::read(path)
            .map_err(|e| AuthError::Setup(format!("{}: {e}", path.display())))?;
        let alg = algorithm(algorithm_name, Algorithm::RS256)?;
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => {
                return Err(AuthError::Setup(
                    "a private key needs algorithm RS256 or EdDSA".into(),
                ))
            }
        }
        .map_err(|e| AuthError::Setup(format!("{}: {e}", path.display())))?;
        Ok(Self {
            algorithm: alg,
            key,
        })
    }
}

/// `30d`, `12h`, `15m`, `3600s` or plain seconds.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration `{s}`"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("bad duration unit in `{s}` (use s, m, h or d)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("duration `{s}` too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn tokens_round_trip_and_scopes_apply() -> TestResult {
        let dir = tempfile::tempdir()?;
        let verifier = Verifier::new(&AuthSettings::default(), dir.path())?;
        let secret = load_or_create_secret(&default_secret_path(dir.path()))?;
        let token = create_token(
            &SigningKey::hs256(&secret),
            "alice",
            &["images:generate".into()],
            60,
            None,
            None,
        )?;
        let p = verifier.verify(&token)?;
        assert_eq!(p.user, "alice");
        assert!(p.has(SCOPE_GENERATE) && !p.has(SCOPE_JOBS_READ) && !p.is_admin());
        let forged = create_token(
            &SigningKey::hs256(b"another-secret-another-secret-xx"),
            "alice",
            &[],
            60,
            None,
            None,
        )?;
        assert!(matches!(
            verifier.verify(&forged),
            Err(AuthError::Invalid(_))
        ));
        Ok(())
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("30d"), Ok(30 * 86400));
        assert_eq!(parse_ttl("90"), Ok(90));
        assert!(parse_ttl("3w").is_err());
    }
}
