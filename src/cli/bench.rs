use super::CommonArgs;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub fn run(_common: &CommonArgs, _args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench: not yet built")
}
