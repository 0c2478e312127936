//! `lb-bench`: every benchmark in one run. `cargo xtask bench` installs the
//! tools, builds the release `lb-agent` and runs this with `--agent`.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;

/// Benchmarks: XDP/TC per-packet cost along services and endpoints, Maglev
/// spread against kube-proxy's random choices, sync latency of the
/// Kubernetes agent, short connections and UDP through this project,
/// kube-proxy's iptables and nftables modes and no load balancer,
/// control-plane times. Needs root. Writes target/bench/results.json.
#[derive(Debug, Parser)]
#[command(name = "lb-bench")]
struct Cli {
    /// The `lb-agent` binary to measure (a release build).
    #[arg(long, value_name = "PATH", required_unless_present = "render")]
    agent: Option<PathBuf>,
    /// 1 and 1,000 services, 100 changes: under two minutes once built.
    #[arg(long)]
    quick: bool,
    /// Also write benchmarks.json, benchmarks.md and benchmarks.svg into
    /// this directory (e.g. docs/).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Measure nothing: re-render the docs of `--out` from this results
    /// file (after a change to the report's text).
    #[arg(long, value_name = "JSON", requires = "out")]
    render: Option<PathBuf>,
    /// Run one part only and print its JSON (no results file, no docs):
    /// while working on that part.
    #[arg(long, value_enum, conflicts_with_all = ["out", "render"])]
    only: Option<lb_bench::Part>,
    /// With `--only sync|sustained|agent`: this many services instead of
    /// the part's sizes.
    #[arg(long, value_name = "N", requires = "only")]
    services: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match (cli.render, cli.out, cli.agent) {
        (Some(json), Some(out), _) => lb_bench::render(&json, &out),
        (_, _, Some(agent)) if cli.only.is_some() => {
            let part = cli.only.unwrap_or(lb_bench::Part::Sync);
            lb_bench::only(&agent, cli.quick, part, cli.services)
        }
        (_, out, Some(agent)) => lb_bench::main(&agent, cli.quick, out),
        _ => Err(anyhow::anyhow!("--agent is required")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
