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
    /// Build lb-agent (and the eBPF object it embeds).
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
    },
    /// Build the container image `localhost/lb-agent:<version>`: a static
    /// (musl) lb-agent in an image `FROM scratch`, with buildah.
    Image,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => xtask::setup::main(),
        Cmd::Build { release } => xtask::build::main(release),
        Cmd::Run { release, args } => xtask::run::main(release, &args),
        Cmd::Test => xtask::test::main(),
        Cmd::Demo { hold } => xtask::demo::main(hold),
        Cmd::Image => xtask::image::main(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
