//! `cargo xtask <command>`: set-up, build, run, test and demo for the load
//! balancer workspace. Each command is a module of the `xtask` library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Developer commands for the eBPF load balancer.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what is missing: system tools (apt), rust-src for the BPF
    /// nightly, the matching bpf-linker; mount bpffs.
    Setup,
    /// Build lb-agent (and the eBPF object it embeds) and the test-only eBPF
    /// object the tests, benches and demo load.
    Build {
        /// Release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build, then exec lb-agent with the arguments after `--`.
    Run {
        /// Release profile.
        #[arg(long)]
        release: bool,
        /// Arguments for lb-agent.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Format and lint checks, host tests, then the kernel tests (root).
    Test,
    /// The agent in a namespace lab: traffic to a NodePort, answers per pod,
    /// the maps through bpftool.
    Demo {
        /// Keep the lab up after the traffic until Ctrl-C.
        #[arg(long)]
        hold: bool,
        /// Two nodes with an agent each and pods on both: traffic through
        /// either node's NodePort reaches pods on both nodes (SNAT and
        /// forwarding in XDP for the remote ones).
        #[arg(long)]
        two_node: bool,
    },
    /// The datapath's differential fuzzer alone: random states and packets
    /// through the kernel programs and the reference model. Needs root.
    Fuzz {
        /// Seed of the case stream (a mismatch prints the seed and case).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Number of packets.
        #[arg(long, default_value_t = 1_000_000)]
        cases: u64,
    },
    /// Build the container image `localhost/lb-agent:<version>`: a static
    /// (musl) lb-agent in an image `FROM scratch`, with buildah.
    Image,
    /// Benchmarks: XDP/TC per-packet cost along
    /// services and endpoints, Maglev spread against kube-proxy's random
    /// choices, sync latency of the Kubernetes agent, short connections and
    /// UDP through this project, kube-proxy's iptables and nftables modes
    /// and no load balancer, control-plane times. Needs root. Writes
    /// target/bench/results.json.
    Bench {
        /// 1 and 1,000 services, 100 changes: under two minutes once built.
        #[arg(long)]
        quick: bool,
        /// Also write benchmarks.json, benchmarks.md and benchmarks.svg into
        /// this directory (e.g. docs/).
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
        /// Measure nothing: re-render the docs of `--out` from this results
        /// file (after a change to the report's text).
        #[arg(long, value_name = "JSON", requires = "out")]
        render: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => xtask::setup::main(),
        Cmd::Build { release } => xtask::build::main(release),
        Cmd::Run { release, args } => xtask::run::main(release, &args),
        Cmd::Test => xtask::test::main(),
        Cmd::Demo { hold, two_node } => {
            if two_node {
                xtask::demo::two_node(hold)
            } else {
                xtask::demo::main(hold)
            }
        }
        Cmd::Image => xtask::image::main(),
        Cmd::Fuzz { seed, cases } => xtask::fuzz::main(seed, cases),
        Cmd::Bench { quick, out, render } => {
            xtask::bench::main(quick, out.as_deref(), render.as_deref())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
