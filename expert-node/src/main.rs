//! `moeshard-expert-node`: thin entry point of the expert-node daemon.

use anyhow::bail;
use clap::Parser;

/// moeshard expert-node daemon
#[derive(Parser, Debug)]
#[command(name = "moeshard-expert-node", version, about)]
struct Cli {
    /// The model file (GGUF) whose experts this node serves.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    bail!("the expert-node daemon is not implemented yet (see the distributed-execution issue)")
}
