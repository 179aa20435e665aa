//! `moeshard-expert-node`: the expert-node daemon (the same as `moeshard expert-node`).

use clap::Parser;
use expert_node::{daemon, NodeArgs};
use tracing_subscriber::EnvFilter;

/// moeshard expert-node daemon: serves routed experts (or slices) from local memory.
#[derive(Parser, Debug)]
#[command(name = "moeshard-expert-node", version, about)]
struct Cli {
    #[command(flatten)]
    node: NodeArgs,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let core = daemon::load(&cli.node)?;
    daemon::serve(&cli.node, core, |transport, addr| {
        // The one line on stdout: launchers read the bound address from it.
        println!("moeshard-expert-node listening on {transport}://{addr}");
    })?;
    Ok(())
}
