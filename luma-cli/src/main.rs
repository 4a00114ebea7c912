//! The `luma` CLI. It is built out in its own issue; for now it only names itself.
use clap::Parser;

/// luma: zero-downtime blue-green deploys of many projects to one Docker engine.
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!("luma: the CLI is not built yet; drive luma-proxy with `luma-proxy --help`");
    std::process::exit(2);
}
