//! `cargo xtask demo`: the agent in a namespace lab with three pods, traffic
//! from a client, the answers per pod, and the maps through bpftool. With
//! `--two-node`: two nodes with two pods each and an agent on each, traffic
//! through both nodes' NodePorts answered by pods on both nodes (the remote
//! ones see the forwarding node's address: SNAT). Cleans up on success,
//! failure and Ctrl-C.
//!
//! The one-node demo ends with the balancing policies side by side (issue
//! 7): the same 30 requests under `maglev`, `round-robin` and
//! `least-connection`, set by the Service annotation and a reload.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd,
    lab::{
        self, Lab,
        agent::SYNCED,
        client::{self, Tally},
        cluster::{self, ClusterLab, Endpoints, NodeId},
        manifest::{self, EchoOptions},
        pins, server,
    },
    setup,
};

/// Requests per protocol.
const REQUESTS: usize = 30;
/// The manifest the demo loads (three pods, 198.18.1.11–13).
const MANIFEST: &str = "deploy/examples/demo.yaml";
/// The Service annotation that chooses the balancing policy (the agent's
/// `lb_userspace::translate::ANNOTATION_BALANCING`).
const ANNOTATION_BALANCING: &str = "lb-agent.dev/balancing";
/// The policies shown side by side, as the annotation spells them.
const POLICIES: [&str; 3] = ["maglev", "round-robin", "least-connection"];

/// The `demo` command. With `hold`, keeps the lab up after the traffic until
/// Ctrl-C, so that the printed bpftool commands can be tried.
pub fn main(hold: bool) -> Result<()> {
    let bin = prepare()?;
    let manifest = crate::workspace_root().join(MANIFEST);
    if !manifest.is_file() {
        bail!("{} not found", manifest.display());
    }

    let mut lab = Lab::new(3)?;
    lab.set_agent_bin(bin.clone());
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
    // The agent reads the lab's manifest file, a copy of MANIFEST: the
    // policy section rewrites it and reloads the agent (SIGHUP).
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("read {}", manifest.display()))?;
    let copy = lab.write_manifest_text(&text)?.to_owned();
    lab.start_agent()?;
    println!(
        "demo: lb-agent synced {} (copied to {})",
        manifest.display(),
        copy.display()
    );

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

    let policy_failed = if lab::interrupted() {
        0
    } else {
        policies(&mut lab, &bin)?
    };

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
    let failed = tcp.errors.len() + udp.errors.len() + policy_failed;
    if failed > 0 {
        bail!(
            "{failed} of {} requests were not answered",
            (2 + POLICIES.len()) * REQUESTS
        );
    }
    Ok(())
}

/// The lab's `demo/echo` manifest with `pods` as endpoints and the Service
/// annotated with the balancing policy `policy`.
fn annotated_echo(pods: &[u8], policy: &str) -> Result<String> {
    let endpoints: Vec<(Ipv4Addr, &str)> = pods
        .iter()
        .map(|&i| (lab::pod_addr(i), manifest::NODE_NAME))
        .collect();
    let mut yaml = manifest::echo_service_with(&endpoints, &EchoOptions::default());
    // The Service comes first in the list: annotate its metadata.
    let anchor = "  kind: Service\n  metadata:\n";
    let at = yaml
        .find(anchor)
        .context("the echo manifest has no Service metadata")?
        + anchor.len();
    yaml.insert_str(
        at,
        &format!("    annotations:\n      {ANNOTATION_BALANCING}: {policy}\n"),
    );
    Ok(yaml)
}

/// The policy section: for each of [`POLICIES`], rewrites the manifest with
/// the annotation, reloads the agent and sends the same [`REQUESTS`] HTTP
/// requests (a new connection each); prints who answered, side by side,
/// then `lb-agent flows` (with one connection held open) and `lb-agent
/// backends`. Returns the number of requests not answered.
fn policies(lab: &mut Lab, bin: &Path) -> Result<usize> {
    let pods: Vec<u8> = lab.pods().keys().copied().collect();
    let frontend = lab::frontend();
    let mut runs: Vec<(&str, Tally)> = Vec::new();
    for policy in POLICIES {
        lab.write_manifest_text(&annotated_echo(&pods, policy)?)?;
        lab.agent()?
            .reload(SYNCED)
            .with_context(|| format!("reload with {ANNOTATION_BALANCING}: {policy}"))?;
        let tally =
            lab.in_client(move || Tally::collect(REQUESTS, || client::http_get(frontend)))?;
        runs.push((policy, tally));
        if lab::interrupted() {
            return Ok(0);
        }
    }

    println!(
        "\nBalancing policies: the same {REQUESTS} HTTP requests to {frontend} (a new connection \
         each, one after the other) under each value of {ANNOTATION_BALANCING} on demo/echo \
         (manifest rewritten, agent reloaded with SIGHUP); the pod that answered each, in order:"
    );
    let width = POLICIES.iter().map(|p| p.len()).max().unwrap_or(0);
    for (policy, tally) in &runs {
        let seq: Vec<&str> = tally
            .answers
            .iter()
            .map(|a| match a.as_deref() {
                Some(pod) => pod.strip_prefix("pod-").unwrap_or(pod),
                None => "x",
            })
            .collect();
        let totals: Vec<String> = pods
            .iter()
            .map(|&i| {
                let label = lab::pod_label(i);
                format!("{label}={:<2}", tally.count(&label))
            })
            .collect();
        let failed = if tally.errors.is_empty() {
            String::new()
        } else {
            format!(
                "  ({} failed, first: {})",
                tally.errors.len(),
                tally.errors[0]
            )
        };
        println!(
            "  {policy:<width$}  {}  | {}{failed}",
            seq.join(" "),
            totals.join(" ")
        );
    }
    println!(
        "Maglev hashes each new connection's 5-tuple (its fresh source port) into the table: \
         even over many flows, but {REQUESTS} requests land like dice. Round-robin takes the pods \
         in turn, exactly {} each. Least-connection picks the pod with the fewest open flows; \
         these requests come one after the other, so every pod has 0 open when a request \
         arrives and the tie goes to the pod Maglev would pick: for sequential requests it \
         looks like Maglev (it differs once connections overlap, as with long sessions).",
        REQUESTS / pods.len().max(1)
    );

    // One connection held open, so that `lb-agent flows` has a flow to show.
    let held: Result<TcpStream> = lab
        .in_client(move || TcpStream::connect_timeout(&frontend, client::TIMEOUT))?
        .context("connect");
    std::thread::sleep(Duration::from_millis(100));
    for args in [
        &["interfaces"][..],
        &["flows", "--service", "demo/echo:http"][..],
        &["backends", "--service", "demo/echo:http"][..],
    ] {
        println!(
            "\n$ lb-agent {} --bpffs-root {}",
            args.join(" "),
            lab.bpffs_root().display()
        );
        let mut c = Command::new(bin);
        c.args(args).arg("--bpffs-root").arg(lab.bpffs_root());
        match cmd::output(&mut c) {
            Ok(out) => print!("{out}"),
            Err(e) => println!("(lb-agent failed: {e:#})"),
        }
    }
    // What the open-flow counts say, from the same maps.
    let mut c = Command::new(bin);
    c.args(["backends", "--service", "demo/echo:http", "--json"])
        .arg("--bpffs-root")
        .arg(lab.bpffs_root());
    let open: Option<u64> = cmd::output(&mut c)
        .ok()
        .and_then(|out| serde_json::from_str::<Vec<serde_json::Value>>(&out).ok())
        .map(|rows| rows.iter().filter_map(|r| r["open_flows"].as_u64()).sum());
    match (&held, open) {
        (Ok(_), Some(1)) => println!(
            "(the one open flow is a connection held open for this listing: the {} HTTP \
             requests above had all ended, so their counts were back to 0)",
            POLICIES.len() * REQUESTS
        ),
        (Ok(_), Some(n)) => println!(
            "({n} flows counted open: one held for this listing, the others not yet ended)"
        ),
        (Ok(_), None) => {}
        (Err(e), _) => println!("(could not hold a connection open: {e:#})"),
    }
    drop(held);
    Ok(runs.iter().map(|(_, t)| t.errors.len()).sum())
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
        "\nPods on the other node see the forwarding node's address (SNAT in the ingress program, at TC on these veths); \
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
