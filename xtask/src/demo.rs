//! `cargo xtask demo`: the agent in a namespace lab with three pods, traffic
//! from a client, the answers per pod, and the maps through bpftool. Cleans
//! up on success, failure and Ctrl-C.

use std::{process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd,
    lab::{self, Lab, client, pins},
    setup,
};

/// Requests per protocol.
const REQUESTS: usize = 30;
/// The manifest the demo loads (three pods, 198.18.1.11–13).
const MANIFEST: &str = "deploy/examples/demo.yaml";

/// The `demo` command. With `hold`, keeps the lab up after the traffic until
/// Ctrl-C, so that the printed bpftool commands can be tried.
pub fn main(hold: bool) -> Result<()> {
    ctrlc::set_handler(|| {
        if lab::interrupted() {
            eprintln!("demo: second interrupt, exiting without cleanup");
            std::process::exit(130);
        }
        eprintln!("demo: interrupted, cleaning up (Ctrl-C again to exit at once)");
        lab::request_stop();
    })
    .context("install Ctrl-C handler")?;

    if !crate::is_root() {
        bail!("the demo needs root (network namespaces and BPF); run it as root");
    }
    setup::ensure(setup::Scope::Full, false)?;
    let bin = crate::build::build(false)?;
    let manifest = crate::workspace_root().join(MANIFEST);
    if !manifest.is_file() {
        bail!("{} not found", manifest.display());
    }

    let mut lab = Lab::new(3)?;
    lab.set_agent_bin(bin);
    println!(
        "demo: lab {} up: client 198.18.0.2 -> node {} (n0), pods {}",
        lab.prefix(),
        lab::NODE_ADDR,
        lab.pods()
            .keys()
            .map(|&i| lab::pod_addr(i).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    lab.start_agent_with(&manifest)?;
    println!("demo: lb-agent synced {}", manifest.display());

    let frontend = lab::frontend();
    let tcp =
        lab.in_client(move || client::Tally::collect(REQUESTS, || client::http_get(frontend)))?;
    print_answers(
        &format!("TCP (HTTP, new connection each) to {frontend}"),
        &tcp,
    );
    let udp =
        lab.in_client(move || client::Tally::collect(REQUESTS, || client::udp_ask(frontend)))?;
    print_answers(&format!("UDP (new socket each) to {frontend}"), &udp);

    println!(
        "\nThe maps (pinned by the agent under {}):",
        lab.bpffs_root().display()
    );
    for map in [
        pins::FRONTENDS_V4,
        pins::BACKENDS_V4,
        pins::CONNTRACK_V4,
        pins::STATS,
    ] {
        println!("  bpftool map dump pinned {}", lab.pin(map).display());
    }
    let shown = lab.pin(pins::FRONTENDS_V4);
    println!("\n$ bpftool map dump pinned {} | head -30", shown.display());
    match cmd::output(
        Command::new(cmd::program("bpftool"))
            .args(["map", "dump", "pinned"])
            .arg(&shown),
    ) {
        Ok(out) => {
            for line in out.lines().take(30) {
                println!("{line}");
            }
        }
        Err(e) => println!("(bpftool failed: {e:#})"),
    }

    if hold {
        println!("\ndemo: holding the lab; press Ctrl-C to clean up");
        while !lab::interrupted() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!("\ndemo: cleaning up");
    drop(lab);
    if lab::interrupted() {
        bail!("interrupted");
    }
    let failed = tcp.errors.len() + udp.errors.len();
    if failed > 0 {
        bail!("{failed} of {} requests were not answered", 2 * REQUESTS);
    }
    Ok(())
}

/// Prints who answered each request, ten to a line, then the totals.
fn print_answers(title: &str, tally: &client::Tally) {
    println!("\n{title}:");
    for chunk in tally.answers.chunks(10) {
        let line: Vec<&str> = chunk
            .iter()
            .map(|a| a.as_deref().unwrap_or("FAILED"))
            .collect();
        println!("  {}", line.join(" "));
    }
    println!("  totals: {tally}");
}
