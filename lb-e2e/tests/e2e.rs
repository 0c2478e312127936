//! End-to-end tests: lb-agent attached in a network-namespace lab, real
//! traffic from a client namespace. They need root and BPF, and run one at a
//! time (`cargo test -p lb-e2e --test e2e -- --test-threads=1`); `cargo xtask
//! test` runs them with `LB_AGENT_BIN` set to a fresh build.
//!
//! Without root they print SKIPPED and pass, except under CI, where they
//! fail. Each test builds its own lab (names carry the pid and a counter),
//! so they also survive a parallel run.

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    thread,
    time::Duration,
};

use lb_testkit::lab::{
    self, Lab,
    agent::{AgentSource, REJECTED},
    client::{self, EchoConn, Talker, Tally},
    manifest, pins,
};

/// Builds a lab with `pods` pods, or returns `None` (after saying why) when
/// the test cannot run here.
fn lab_or_skip(test: &str, pods: u8) -> Option<Lab> {
    if !lb_testkit::guard::can_run_as_root(test) {
        return None;
    }
    Some(Lab::new(pods).unwrap_or_else(|e| panic!("{test}: building the lab: {e:#}")))
}

/// A lab with pods 1-3 and the agent running on them (see [`lab_or_skip`]).
fn lab_with_agent(test: &str) -> Option<Lab> {
    let mut lab = lab_or_skip(test, 3)?;
    lab.write_manifest(&[1, 2, 3]).unwrap();
    lab.start_agent().unwrap();
    Some(lab)
}

/// `n` HTTP requests on new connections from the client to `addr`.
fn http_many(lab: &Lab, addr: SocketAddr, n: usize) -> Tally {
    lab.in_client(move || Tally::collect(n, || client::http_get(addr)))
        .expect("client thread")
}

/// `n` UDP requests from new sockets from the client to `addr`.
fn udp_many(lab: &Lab, addr: SocketAddr, n: usize) -> Tally {
    lab.in_client(move || Tally::collect(n, || client::udp_ask(addr)))
        .expect("client thread")
}

/// Asserts that no exchange of a [`Talker`] failed and that every answer
/// came from `serving`. Returns the answers.
fn assert_talk(
    answers: Vec<Result<String, String>>,
    what: &str,
    serving: &str,
) -> Vec<Result<String, String>> {
    let errors: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    let pods: BTreeSet<&String> = answers.iter().filter_map(|a| a.as_ref().ok()).collect();
    println!(
        "{what}: {} exchanges, {} errors, answered by {pods:?}",
        answers.len(),
        errors.len()
    );
    assert!(errors.is_empty(), "{what} broke: {errors:?}");
    assert_eq!(
        pods.into_iter().map(String::as_str).collect::<Vec<_>>(),
        vec![serving],
        "{what} moved"
    );
    answers
}

/// Asserts that every request was answered.
fn assert_all_answered(what: &str, tally: &Tally) {
    assert!(
        tally.errors.is_empty() && tally.total() > 0,
        "{what}: {tally}\nerrors: {:#?}",
        tally.errors.iter().take(10).collect::<Vec<_>>()
    );
}

/// The client's veth with transmit checksum offload on, as real veths are:
/// its packets reach the node with partial checksums. `--attach auto` runs
/// the ingress logic at TC there, whose checksum helpers keep them right:
/// every TCP and UDP request is answered and no pod counts a checksum error.
#[test]
fn services_answer_with_transmit_checksum_offload_on() {
    if !lb_testkit::guard::can_run_as_root("services_answer_with_transmit_checksum_offload_on") {
        return;
    }
    let mut lab = Lab::with_tx_offload(3).expect("building the lab");
    lab.write_manifest(&[1, 2, 3]).unwrap();
    lab.start_agent().unwrap();
    let tcp = http_many(&lab, lab::frontend(), 60);
    assert_all_answered("TCP with offload on", &tcp);
    let udp = udp_many(&lab, lab::frontend(), 60);
    assert_all_answered("UDP with offload on", &udp);
    for (i, pod) in lab.pods() {
        let out = lb_testkit::cmd::output(pod.ns().command("nstat").args([
            "-az",
            "TcpInCsumErrors",
            "UdpInCsumErrors",
        ]))
        .unwrap();
        let errors: u64 = out
            .lines()
            .filter(|l| l.contains("CsumErrors"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        assert_eq!(errors, 0, "pod {i} counted checksum errors:\n{out}");
    }
    let st = lab.stats().unwrap();
    assert!(
        st["tc_ingress_packets"] > 0 && st["xdp_packets"] == 0,
        "{st:?}"
    );
}

/// The lab without the agent: the client reaches the pods through the
/// node's routing (checks the topology itself, so that a failure of the
/// other tests points at the agent, not the lab).
#[test]
fn lab_routes_client_to_pods_without_agent() {
    let Some(lab) = lab_or_skip("lab_routes_client_to_pods_without_agent", 2) else {
        return;
    };
    for i in [1, 2] {
        let addr = SocketAddr::V4(SocketAddrV4::new(lab::pod_addr(i), manifest::POD_PORT));
        let tcp = http_many(&lab, addr, 5);
        let udp = udp_many(&lab, addr, 5);
        println!("direct to {addr}: tcp {tcp}; udp {udp}");
        assert_all_answered("tcp", &tcp);
        assert_all_answered("udp", &udp);
        assert_eq!(tcp.count(&lab::pod_label(i)), 5, "tcp {tcp}");
        assert_eq!(udp.count(&lab::pod_label(i)), 5, "udp {udp}");
    }
}

#[test]
fn nodeport_spread_tcp_udp() {
    let Some(lab) = lab_with_agent("nodeport_spread_tcp_udp") else {
        return;
    };

    const N: usize = 600;
    let tcp = http_many(&lab, lab::frontend(), N);
    let udp = udp_many(&lab, lab::frontend(), N);
    println!("TCP {tcp}");
    println!("UDP {udp}");
    assert_all_answered("TCP", &tcp);
    assert_all_answered("UDP", &udp);
    for (proto, tally) in [("TCP", &tcp), ("UDP", &udp)] {
        for i in 1..=3 {
            let share = tally.share(&lab::pod_label(i));
            assert!(
                (0.25..=0.42).contains(&share),
                "{proto}: pod-{i} got {:.1}% of the flows, expected 25%..42%: {tally}",
                share * 100.0
            );
        }
    }
}

#[test]
fn long_lived_connection_survives_backend_changes() {
    let Some(mut lab) = lab_with_agent("long_lived_connection_survives_backend_changes") else {
        return;
    };

    let frontend = lab::frontend();
    let mut conn = lab
        .in_client(move || EchoConn::connect(frontend))
        .unwrap()
        .expect("open the long-lived connection");
    let serving = conn.ask("hello").expect("first echo");
    let serving_index: u8 = serving
        .strip_prefix("pod-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected responder {serving:?}"));
    println!("long-lived connection is served by {serving}");

    // Talk every 100 ms on another thread while the backends change.
    let talker = Talker::start(conn);

    let keep_going = Duration::from_millis(1_200);
    thread::sleep(keep_going);
    // A fourth backend.
    lab.add_pod(4).unwrap();
    lab.reload(&[1, 2, 3, 4]).unwrap();
    thread::sleep(keep_going);
    // Remove one of the other original backends.
    let removed = [1, 2, 3].into_iter().find(|&i| i != serving_index).unwrap();
    let remaining: Vec<u8> = [1, 2, 3, 4].into_iter().filter(|&i| i != removed).collect();
    lab.reload(&remaining).unwrap();
    println!("removed pod-{removed}; endpoints now {remaining:?}");
    thread::sleep(keep_going);

    let answers = assert_talk(talker.finish(), "long-lived connection", &serving);
    assert!(answers.len() >= 30, "only {} exchanges", answers.len());

    // New connections: the new pod gets some, the removed one none.
    let tcp = http_many(&lab, frontend, 90);
    let udp = udp_many(&lab, frontend, 60);
    println!("after the changes: TCP {tcp}; UDP {udp}");
    assert_all_answered("TCP after changes", &tcp);
    assert_all_answered("UDP after changes", &udp);
    for (proto, tally) in [("TCP", &tcp), ("UDP", &udp)] {
        assert!(
            tally.count("pod-4") > 0,
            "{proto}: pod-4 never answered: {tally}"
        );
        assert_eq!(
            tally.count(&lab::pod_label(removed)),
            0,
            "{proto}: removed pod-{removed} still gets new flows: {tally}"
        );
    }
}

#[test]
fn non_service_traffic_untouched() {
    let Some(mut lab) = lab_or_skip("non_service_traffic_untouched", 1) else {
        return;
    };
    lab.write_manifest(&[1]).unwrap();
    lab.start_agent().unwrap();

    // The ingress logic is attached where the traffic arrives: at TC
    // ingress, as `--attach auto` chooses for a veth; the inspection says so.
    let listed = lb_testkit::cmd::output(
        std::process::Command::new(lb_testkit::lab::agent::binary().unwrap())
            .arg("interfaces")
            .arg("--bpffs-root")
            .arg(lab.bpffs_root()),
    )
    .unwrap();
    assert_eq!(
        listed,
        format!("{}\tingress=tc\tegress=tc\n", lab::NODE_IFACE),
        "lb-agent interfaces"
    );

    // ICMP.
    let ping = lab
        .client()
        .command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "2"])
        .arg(lab::NODE_ADDR.to_string())
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "ping failed: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );

    // TCP and UDP to a server of the node itself.
    lab.start_node_server("node", 9000).unwrap();
    let node_9000 = SocketAddr::V4(SocketAddrV4::new(lab::NODE_ADDR, 9000));
    let tcp = http_many(&lab, node_9000, 20);
    let udp = udp_many(&lab, node_9000, 20);
    println!("node:9000 TCP {tcp}; UDP {udp}");
    assert_all_answered("TCP to node:9000", &tcp);
    assert_all_answered("UDP to node:9000", &udp);
    assert_eq!(tcp.count("node"), 20, "{tcp}");
    assert_eq!(udp.count("node"), 20, "{udp}");

    // UDP to a closed port: ICMP port unreachable, seen as ECONNREFUSED.
    let closed = SocketAddr::V4(SocketAddrV4::new(lab::NODE_ADDR, 9001));
    let result = lab
        .in_client(move || -> std::io::Result<usize> {
            let socket = UdpSocket::bind(("0.0.0.0", 0))?;
            socket.connect(closed)?;
            socket.set_read_timeout(Some(client::TIMEOUT))?;
            socket.send(b"anyone?")?;
            socket.recv(&mut [0u8; 64])
        })
        .unwrap();
    match result {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!("UDP to closed port {closed}: expected connection refused, got {other:?}"),
    }
}

#[test]
fn bpftool_dump_shows_field_names() {
    let Some(mut lab) = lab_or_skip("bpftool_dump_shows_field_names", 2) else {
        return;
    };
    lab.write_manifest(&[1, 2]).unwrap();
    lab.start_agent().unwrap();

    let frontends = lab.bpftool_dump(pins::FRONTENDS_V4, true).unwrap();
    println!("{}", frontends.chars().take(1_500).collect::<String>());
    for field in ["service_id", "backend_count", "port_be"] {
        assert!(
            frontends.contains(&format!("\"{field}\"")),
            "no field `{field}` in the {} dump:\n{frontends}",
            pins::FRONTENDS_V4
        );
    }
    let backends = lab.bpftool_dump(pins::BACKENDS_V4, true).unwrap();
    assert!(
        backends.contains("\"addr\""),
        "no field `addr` in the {} dump:\n{backends}",
        pins::BACKENDS_V4
    );
    // The plain format carries the names too.
    let plain = lab.bpftool_dump(pins::FRONTENDS_V4, false).unwrap();
    assert!(plain.contains("service_id"), "plain dump:\n{plain}");
}

#[test]
fn reload_with_bad_manifest_keeps_state() {
    let Some(mut lab) = lab_with_agent("reload_with_bad_manifest_keeps_state") else {
        return;
    };
    let before = http_many(&lab, lab::frontend(), 30);
    assert_all_answered("TCP before the bad reload", &before);

    lab.write_manifest_text(manifest::MALFORMED).unwrap();
    lab.agent().unwrap().reload(REJECTED).unwrap();
    let log = lab.agent().unwrap().log();
    let rejected: Vec<&str> = log.lines().filter(|l| l.contains(REJECTED)).collect();
    println!("agent: {rejected:?}");

    let tcp = http_many(&lab, lab::frontend(), 60);
    let udp = udp_many(&lab, lab::frontend(), 60);
    println!("after the bad reload: TCP {tcp}; UDP {udp}");
    assert_all_answered("TCP after the bad reload", &tcp);
    assert_all_answered("UDP after the bad reload", &udp);
    for i in 1..=3 {
        let pod = lab::pod_label(i);
        assert!(tcp.count(&pod) > 0, "TCP: {pod} never answered: {tcp}");
        assert!(udp.count(&pod) > 0, "UDP: {pod} never answered: {udp}");
    }
}

#[test]
fn agent_killed_and_restarted_under_traffic_keeps_flows() {
    let Some(mut lab) = lab_or_skip("agent_killed_and_restarted_under_traffic_keeps_flows", 3)
    else {
        return;
    };
    let manifest = lab.write_manifest(&[1, 2, 3]).unwrap().to_owned();
    let keep = ["--keep-datapath-on-exit".to_string()];
    lab.start_agent_from(AgentSource::Manifests(&manifest), &keep)
        .unwrap();
    let frontend = lab::frontend();
    let mut conn = lab
        .in_client(move || EchoConn::connect(frontend))
        .unwrap()
        .expect("open the long-lived connection");
    let serving = conn.ask("hello").expect("first echo");
    let talker = Talker::start(conn);
    thread::sleep(Duration::from_millis(500));

    // SIGKILL: no cleanup at all. The pinned links keep the programs
    // attached and the pinned maps keep every flow.
    lab.kill_agent().unwrap();
    thread::sleep(Duration::from_millis(1_500));
    let during = http_many(&lab, frontend, 30);
    println!("while no agent runs: TCP {during}");
    assert_all_answered("TCP with the agent dead", &during);

    // A new agent takes over the pinned links atomically.
    lab.start_agent_from(AgentSource::Manifests(&manifest), &keep)
        .unwrap();
    let log = lab.agent().unwrap().log();
    assert!(
        log.contains("replaced the program of the pinned TC Ingress link"),
        "the restarted agent did not reuse the pinned link:\n{log}"
    );
    thread::sleep(Duration::from_millis(800));

    // A graceful stop with --keep-datapath-on-exit, and a third agent.
    lab.stop_agent().unwrap();
    thread::sleep(Duration::from_millis(800));
    lab.start_agent_from(AgentSource::Manifests(&manifest), &keep)
        .unwrap();
    thread::sleep(Duration::from_millis(800));

    let answers = assert_talk(
        talker.finish(),
        "connection across two agent restarts",
        &serving,
    );
    assert!(answers.len() >= 30, "only {} exchanges", answers.len());
    let after = http_many(&lab, frontend, 60);
    println!("after the restarts: TCP {after}");
    assert_all_answered("TCP after the restarts", &after);
}

#[test]
fn metrics_health_and_readiness_endpoints() {
    let Some(lab) = lab_with_agent("metrics_health_and_readiness_endpoints") else {
        return;
    };
    let frontend = lab::frontend();
    let tally = http_many(&lab, frontend, 40);
    assert_all_answered("TCP", &tally);

    let base = SocketAddr::from((lab::NODE_ADDR, 9995));
    let get = |path: &'static str| {
        lab.in_client(move || client::http_get_path(base, path))
            .unwrap()
            .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
    };
    assert_eq!(get("/healthz"), "ok");
    assert_eq!(get("/readyz"), "ready");
    let metrics = get("/metrics");
    let value = |line_start: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no `{line_start}` in /metrics:\n{metrics}"))
    };
    assert_eq!(value("lb_services "), 2, "http and echo-udp ports");
    assert_eq!(value("lb_backends{state=\"active\"} "), 6);
    let mut flows = 0;
    for i in 1..=3u8 {
        let pod = lab::pod_addr(i);
        let n = value(&format!(
            "lb_backend_new_flows_total{{service=\"demo/echo:http\",backend=\"{pod}:8080\"}} "
        ));
        assert_eq!(
            n,
            tally.count(&lab::pod_label(i)) as u64,
            "new flows of {pod}"
        );
        flows += n;
    }
    assert_eq!(flows, 40);
    assert!(value("lb_datapath_total{counter=\"new_flows\"} ") >= 40);
    assert!(metrics.contains("lb_sync_duration_seconds_bucket"));
    println!(
        "/metrics: {} lines, 40 flows accounted per backend",
        metrics.lines().count()
    );
}
