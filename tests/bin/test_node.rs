//! `moeshard-test-node`: the expert-node daemon for the end-to-end tests — the same
//! `expert_node::daemon::{load, serve}` calls and the same ready line as
//! `moeshard expert-node` and `moeshard-expert-node`, built by `cargo test -p tests` so the
//! tests always run the daemon of the tree under test.

use clap::Parser;
use expert_node::{daemon, NodeArgs};
use tracing_subscriber::EnvFilter;

/// The expert-node daemon, for moeshard's end-to-end tests.
#[derive(Parser, Debug)]
#[command(name = "moeshard-test-node")]
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
        // The one line on stdout: the harness reads the bound address from it.
        println!("moeshard-expert-node listening on {transport}://{addr}");
    })?;
    Ok(())
}
