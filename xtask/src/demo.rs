//! `cargo xtask demo`: the agent in a namespace lab with three pods, traffic
//! from a client, the answers per pod, and the maps through bpftool. With
//! `--two-node`: two nodes with two pods each and an agent on each, traffic
//! through both nodes' NodePorts answered by pods on both nodes (the remote
//! ones see the forwarding node's address: SNAT). Cleans up on success,
//! failure and Ctrl-C.

use std::{collections::BTreeMap, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd,
    lab::{
        self, Lab,
        client::{self, Tally},
        cluster::{self, ClusterLab, Endpoints, NodeId},
        manifest::EchoOptions,
        pins, server,
    },
    setup,
};

/// Requests per protocol.
const REQUESTS: usize = 30;
/// The manifest the demo loads (three pods, 198.18.1.11–13).
const MANIFEST: &str = "deploy/examples/demo.yaml";

/// The `demo` command. With `hold`, keeps the lab up after the traffic until
/// Ctrl-C, so that the printed bpftool commands can be tried.
pub fn main(hold: bool) -> Result<()> {
    let bin = prepare()?;
    let manifest = crate::workspace_root().join(MANIFEST);
    if !manifest.is_file() {
        bail!("{} not found", manifest.display());
    }

    if lab::interrupted() {
        eprintln!("demo: second interrupt, exiting without cleanup");
        std::process::exit(130);
    }
    eprintln!("demo: interrupted, cleaning up (Ctrl-C again to exit at once)");
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

/// The Ctrl-C handler, the root check, set-up and the agent build shared by
/// both demos; returns the agent binary.
fn prepare() -> Result<PathBuf> {
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
    crate::build::build(false)
}

/// `cargo xtask demo --two-node`. With `hold`, keeps the lab up after the
/// traffic until Ctrl-C.
pub fn two_node(hold: bool) -> Result<()> {
    let bin = prepare()?;
    let mut lab = ClusterLab::new(2, Some(bin))?;
    println!(
        "demo: two-node lab {} up: client {} on a bridge with node-a {} and node-b {}",
        lab.prefix(),
        cluster::CLIENT_ADDR,
        NodeId::A.addr(),
        NodeId::B.addr()
    );
    for id in NodeId::ALL {
        let pods: Vec<String> = lab
            .pods(id)
            .keys()
            .map(|&i| format!("{} {}", cluster::pod_label(id, i), cluster::pod_addr(id, i)))
            .collect();
        println!("demo:   {id}: pods {}", pods.join(", "));
    }
    let manifest = lab
        .write_manifest(&Endpoints::all(2), &EchoOptions::default())?
        .to_owned();
    lab.start_agents(&[])?;
    println!(
        "demo: lb-agent synced on both nodes ({}: demo/echo, NodePort 30090, \
         externalTrafficPolicy: Cluster, endpoints on both nodes)",
        manifest.display()
    );

    let mut failed = 0;
    for id in NodeId::ALL {
        let frontend = cluster::nodeport(id);
        let tcp = lab.in_client(move || {
            Tally::collect(REQUESTS, || {
                client::http_get_path(frontend, server::WHOAMI_PATH)
            })
        })?;
        print_whoami(
            &format!("TCP (GET /whoami, new connection each) through {id} {frontend}"),
            &tcp,
        );
        let udp = lab.in_client(move || {
            Tally::collect(REQUESTS, || {
                client::udp_ask_from(0, frontend, server::WHOAMI_UDP)
            })
        })?;
        print_whoami(
            &format!("UDP (new socket each) through {id} {frontend}"),
            &udp,
        );
        failed += tcp.errors.len() + udp.errors.len();
        if lab::interrupted() {
            break;
        }
    }
    println!(
        "\nPods on the other node see the forwarding node's address (SNAT in XDP); \
         pods on the node itself see the client {}.",
        cluster::CLIENT_ADDR
    );
    for id in NodeId::ALL {
        match lab.stats(id) {
            Ok(stats) => {
                let shown: Vec<String> = [
                    "new_flows",
                    "forwarded",
                    "reverse_snat",
                    "tc_reverse_nat",
                    "snat_exhausted",
                ]
                .iter()
                .filter_map(|k| stats.get(*k).map(|v| format!("{k}={v}")))
                .collect();
                println!("  {id} LB_STATS: {}", shown.join(" "));
            }
            Err(e) => println!("  {id} LB_STATS: (bpftool failed: {e:#})"),
        }
        println!(
            "    bpftool map dump pinned {}",
            lab.pin(id, pins::STATS).display()
        );
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
    if failed > 0 {
        bail!("{failed} of {} requests were not answered", 4 * REQUESTS);
    }
    Ok(())
}

/// Prints the pod of each `whoami` answer, ten to a line, then per pod the
/// count and the source address it saw.
fn print_whoami(title: &str, tally: &Tally) {
    println!("\n{title}:");
    for chunk in tally.answers.chunks(10) {
        let line: Vec<&str> = chunk
            .iter()
            .map(|a| match a {
                Some(a) => a.split(' ').next().unwrap_or(a),
                None => "FAILED",
            })
            .collect();
        println!("  {}", line.join(" "));
    }
    let mut per_pod: BTreeMap<&str, (usize, Vec<&str>)> = BTreeMap::new();
    for (answer, &n) in &tally.by_pod {
        let (pod, source) = answer.split_once(' ').unwrap_or((answer, "?"));
        let entry = per_pod.entry(pod).or_default();
        entry.0 += n;
        if !entry.1.contains(&source) {
            entry.1.push(source);
        }
    }
    for (pod, (n, sources)) in per_pod {
        println!("  {pod}: {n:>3} answers, saw source {}", sources.join(", "));
    }
    println!(
        "  {}/{} answered{}",
        tally.answered(),
        tally.total(),
        tally
            .errors
            .first()
            .map(|e| format!(" ({} errors, first: {e})", tally.errors.len()))
            .unwrap_or_default()
    );
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
