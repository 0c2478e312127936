//! Two-node tests: `lb-agent` on two nodes of a namespace lab
//! (`lb_testkit::lab::cluster`), a client on the same L2 segment, pods on both
//! nodes. Remote endpoints (eTP=Cluster) are reached through the node the
//! client talks to, with SNAT to that node's address; eTP=Local keeps the
//! client's address and the node's own pods.
//!
//! They need root and BPF, and run one at a time (`cargo test -p lb-e2e
//! --test cluster -- --test-threads=1`); `cargo xtask test` runs them with
//! `LB_AGENT_BIN` set to a fresh build. Without root they print SKIPPED and
//! pass, except under CI, where they fail.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    thread,
    time::{Duration, Instant},
};

use lb_testkit::lab::{
    client::{self, EchoConn, Talker, Tally},
    cluster::{self, ClusterLab, Endpoints, NodeId},
    manifest::{self, EchoOptions},
    server,
};

/// Builds a kind-like lab with `pods` pods per node (no XDP program on the
/// wire: the agents' `--attach auto` runs TC ingress on the nodes' veths),
/// or returns `None` (after saying why) when the test cannot run here.
fn lab_or_skip(test: &str, pods_a: u8, pods_b: u8) -> Option<ClusterLab> {
    if !lb_testkit::guard::can_run_as_root(test) {
        return None;
    }
    Some(
        ClusterLab::build(pods_a, pods_b, None, false)
            .unwrap_or_else(|e| panic!("{test}: building the cluster lab: {e:#}")),
    )
}

/// A lab with 2 pods per node, `endpoints` in the manifest with `options`,
/// and both agents running. Kind-like: each node's `n0` is a veth whose
/// peer sits on a Linux bridge without any XDP program, and the agents run
/// with `--attach auto` (TC ingress there).
fn lab_with_agents(test: &str, endpoints: &Endpoints, options: &EchoOptions) -> Option<ClusterLab> {
    let mut lab = lab_or_skip(test, 2, 2)?;
    lab.write_manifest(endpoints, options).unwrap();
    lab.start_agents(&[]).unwrap();
    Some(lab)
}

/// A batch of requests stops after this many failures: the test fails
/// anyway, and each failure costs a client timeout.
const MAX_ERRORS: usize = 5;

/// Runs `request` `n` times (fewer after [`MAX_ERRORS`] failures).
fn collect(n: usize, mut request: impl FnMut() -> anyhow::Result<String>) -> Tally {
    let mut tally = Tally::default();
    for _ in 0..n {
        tally.record(request());
        if tally.errors.len() >= MAX_ERRORS {
            break;
        }
    }
    tally
}

/// `n` HTTP GETs of `path` on new connections from the client to `addr`.
fn http_many(lab: &ClusterLab, addr: SocketAddr, path: &'static str, n: usize) -> Tally {
    lab.in_client(move || collect(n, || client::http_get_path(addr, path)))
        .expect("client thread")
}

/// `n` UDP datagrams with `payload` from new sockets from the client to `addr`.
fn udp_many(lab: &ClusterLab, addr: SocketAddr, payload: &'static [u8], n: usize) -> Tally {
    lab.in_client(move || collect(n, || client::udp_ask_from(0, addr, payload)))
        .expect("client thread")
}

fn assert_all_answered(lab: &ClusterLab, what: &str, tally: &Tally) {
    assert!(
        tally.errors.is_empty() && tally.total() > 0,
        "{what}: {tally}\nerrors: {:#?}\n{}",
        tally.errors.iter().take(10).collect::<Vec<_>>(),
        lab.agent_logs()
    );
}

/// The `(node, peer address)` of each `<pod> <peer-ip>` answer of a
/// `whoami` tally, with its count.
fn whoami(tally: &Tally) -> BTreeMap<(String, Ipv4Addr), usize> {
    let mut seen = BTreeMap::new();
    for (answer, &n) in &tally.by_pod {
        let (pod, ip) = answer
            .split_once(' ')
            .unwrap_or_else(|| panic!("not a whoami answer: {answer:?}"));
        let ip: Ipv4Addr = ip
            .parse()
            .unwrap_or_else(|_| panic!("not an address in {answer:?}"));
        *seen.entry((pod.to_owned(), ip)).or_default() += n;
    }
    seen
}

/// Asserts that every `whoami` answer in `tally` from a pod on `node` names
/// `expected` as the source it saw.
fn assert_sources(what: &str, tally: &Tally, node: NodeId, expected: Ipv4Addr) {
    for ((pod, ip), n) in whoami(tally) {
        let (on, _) = cluster::parse_label(&pod).unwrap_or_else(|| panic!("pod label {pod:?}"));
        if on == node {
            assert_eq!(
                ip, expected,
                "{what}: {pod} (on {node}) saw source {ip} on {n} requests, expected {expected}: {tally}"
            );
        }
    }
}

/// The nodes whose pods answered in `tally` (plain or whoami answers).
fn nodes_of(tally: &Tally) -> BTreeSet<NodeId> {
    tally
        .by_pod
        .keys()
        .filter_map(|a| cluster::parse_label(a.split(' ').next().unwrap_or_default()))
        .map(|(node, _)| node)
        .collect()
}

/// The lab without agents: plain routing between the client, both nodes
/// and their pods (checks the topology, so that a failure elsewhere points
/// at the agents, not the lab).
#[test]
fn cluster_lab_routes_without_agents() {
    let Some(lab) = lab_or_skip("cluster_lab_routes_without_agents", 1, 2) else {
        return;
    };
    for (node, i) in [(NodeId::A, 1), (NodeId::B, 1), (NodeId::B, 2)] {
        let addr = SocketAddr::V4(SocketAddrV4::new(
            cluster::pod_addr(node, i),
            manifest::POD_PORT,
        ));
        let tcp = http_many(&lab, addr, server::WHOAMI_PATH, 5);
        let udp = udp_many(&lab, addr, server::WHOAMI_UDP, 5);
        println!("client -> {addr}: tcp {tcp}; udp {udp}");
        assert_all_answered(&lab, "tcp", &tcp);
        assert_all_answered(&lab, "udp", &udp);
        let expected = format!("{} {}", cluster::pod_label(node, i), cluster::CLIENT_ADDR);
        assert_eq!(tcp.count(&expected), 5, "tcp {tcp}");
        assert_eq!(udp.count(&expected), 5, "udp {udp}");
    }
    // Pod to pod across the nodes: a1 -> b2, routed by both nodes.
    let b2 = SocketAddr::V4(SocketAddrV4::new(
        cluster::pod_addr(NodeId::B, 2),
        manifest::POD_PORT,
    ));
    let answer = lab.pods(NodeId::A)[&1]
        .ns()
        .run(move || client::http_get_path(b2, server::WHOAMI_PATH))
        .unwrap()
        .expect("pod-a1 -> pod-b2");
    assert_eq!(
        answer,
        format!("pod-b2 {}", cluster::pod_addr(NodeId::A, 1)),
        "pod to pod"
    );
}

#[test]
fn nodeport_cluster_policy_spreads_over_both_nodes_with_snat() {
    let test = "nodeport_cluster_policy_spreads_over_both_nodes_with_snat";
    let Some(lab) = lab_with_agents(test, &Endpoints::all(2), &EchoOptions::default()) else {
        return;
    };
    let a = cluster::nodeport(NodeId::A);

    const N: usize = 300;
    let tcp = http_many(&lab, a, "/", N);
    let udp = udp_many(&lab, a, b"hello\n", N);
    println!("through node-a: TCP {tcp}");
    println!("through node-a: UDP {udp}");
    assert_all_answered(&lab, "TCP through node-a", &tcp);
    assert_all_answered(&lab, "UDP through node-a", &udp);
    for (proto, tally) in [("TCP", &tcp), ("UDP", &udp)] {
        for node in NodeId::ALL {
            for i in 1..=2 {
                let pod = cluster::pod_label(node, i);
                let share = tally.share(&pod);
                assert!(
                    (0.15..=0.35).contains(&share),
                    "{proto}: {pod} got {:.1}% of the flows through node-a, expected \
                     15%..35% (Maglev over 4 endpoints): {tally}\n{}",
                    share * 100.0,
                    lab.agent_logs()
                );
            }
        }
    }

    // The source the pods saw: node-a's address on node-b (SNAT), the
    // client's on node-a (plain DNAT).
    let tcp = http_many(&lab, a, server::WHOAMI_PATH, 80);
    let udp = udp_many(&lab, a, server::WHOAMI_UDP, 80);
    println!("whoami through node-a: TCP {tcp}");
    println!("whoami through node-a: UDP {udp}");
    for (proto, tally) in [("TCP", &tcp), ("UDP", &udp)] {
        assert_all_answered(&lab, &format!("{proto} whoami through node-a"), tally);
        assert_eq!(
            nodes_of(tally),
            NodeId::ALL.into_iter().collect(),
            "{proto} whoami: not both nodes' pods answered: {tally}"
        );
        assert_sources(proto, tally, NodeId::B, NodeId::A.addr());
        assert_sources(proto, tally, NodeId::A, cluster::CLIENT_ADDR);
    }

    // And the other way round, through node-b.
    let b = cluster::nodeport(NodeId::B);
    let tcp = http_many(&lab, b, server::WHOAMI_PATH, 100);
    let udp = udp_many(&lab, b, server::WHOAMI_UDP, 100);
    println!("whoami through node-b: TCP {tcp}");
    println!("whoami through node-b: UDP {udp}");
    for (proto, tally) in [("TCP", &tcp), ("UDP", &udp)] {
        assert_all_answered(&lab, &format!("{proto} through node-b"), tally);
        assert_eq!(
            nodes_of(tally),
            NodeId::ALL.into_iter().collect(),
            "{proto} through node-b: not both nodes' pods answered: {tally}"
        );
        assert_sources(proto, tally, NodeId::A, NodeId::B.addr());
        assert_sources(proto, tally, NodeId::B, cluster::CLIENT_ADDR);
    }
    let stats = lab.stats(NodeId::A).unwrap();
    println!("node-a LB_STATS: {stats:?}");
}

#[test]
fn nodeport_local_policy_serves_own_pods_with_client_address() {
    let test = "nodeport_local_policy_serves_own_pods_with_client_address";
    let local = EchoOptions {
        local_policy: true,
        ..EchoOptions::default()
    };
    let Some(lab) = lab_with_agents(test, &Endpoints::all(2), &local) else {
        return;
    };
    for node in NodeId::ALL {
        let addr = cluster::nodeport(node);
        let tcp = http_many(&lab, addr, server::WHOAMI_PATH, 100);
        let udp = udp_many(&lab, addr, server::WHOAMI_UDP, 100);
        println!("eTP=Local through {node}: TCP {tcp}");
        println!("eTP=Local through {node}: UDP {udp}");
        for (proto, tally) in [("TCP", &tcp), ("UDP", &udp)] {
            assert_all_answered(&lab, &format!("{proto} through {node}"), tally);
            assert_eq!(
                nodes_of(tally),
                BTreeSet::from([node]),
                "{proto}: eTP=Local through {node} was served by another node's pods: {tally}"
            );
            let pods: BTreeSet<String> = whoami(tally).into_keys().map(|(p, _)| p).collect();
            assert_eq!(
                pods.len(),
                2,
                "{proto} through {node}: not both local pods answered: {tally}"
            );
            assert_sources(proto, tally, node, cluster::CLIENT_ADDR);
        }
    }
}

#[test]
fn remote_connection_survives_agent_restart() {
    let test = "remote_connection_survives_agent_restart";
    let Some(mut lab) = lab_with_agents(test, &Endpoints::all(2), &EchoOptions::default()) else {
        return;
    };
    let a = cluster::nodeport(NodeId::A);

    // A long-lived connection through node-a served by a pod on node-b
    // (Maglev decides: try new connections until one lands there).
    let mut found = None;
    let mut tried = Vec::new();
    for _ in 0..40 {
        let mut conn = lab
            .in_client(move || EchoConn::connect(a))
            .unwrap()
            .unwrap_or_else(|e| panic!("connect through node-a: {e:#}\n{}", lab.agent_logs()));
        let pod = conn
            .ask("hello")
            .unwrap_or_else(|e| panic!("first echo: {e:#}\n{}", lab.agent_logs()));
        if pod.starts_with("pod-b") {
            found = Some((conn, pod));
            break;
        }
        tried.push(pod);
    }
    let Some((conn, serving)) = found else {
        panic!("40 connections through node-a, none served by node-b: {tried:?}");
    };
    println!("long-lived connection through node-a is served by {serving}");
    let talker = Talker::start(conn);
    thread::sleep(Duration::from_millis(800));

    let old_log = lab.kill_agent(NodeId::A).unwrap();
    println!("killed node-a's agent (SIGKILL)");
    thread::sleep(Duration::from_millis(1_500));
    let during = http_many(&lab, a, "/", 40);
    println!("while node-a has no agent: TCP {during}");
    assert_all_answered(&lab, "TCP through node-a with its agent dead", &during);

    lab.restart_agent(NodeId::A).unwrap();
    let log = lab.agent(NodeId::A).unwrap().log();
    assert!(
        log.contains("replaced the program of the pinned TC Ingress link"),
        "the restarted agent did not reuse the pinned link:\n{log}\nprevious run:\n{old_log}"
    );
    // Long enough for a few GC rounds of the new agent (default interval 5 s).
    thread::sleep(Duration::from_millis(6_000));

    let answers = talker.finish();
    let errors: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    let pods: BTreeSet<&String> = answers.iter().filter_map(|a| a.as_ref().ok()).collect();
    println!(
        "long-lived connection: {} exchanges, {} errors, answered by {pods:?}",
        answers.len(),
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "the connection to {serving} broke across the restart: {} errors, first {:?}\n{}",
        errors.len(),
        errors.first(),
        lab.agent_logs()
    );
    assert_eq!(
        pods.into_iter().cloned().collect::<Vec<_>>(),
        vec![serving.clone()],
        "the connection moved"
    );
    assert!(answers.len() >= 60, "only {} exchanges", answers.len());

    let after = http_many(&lab, a, server::WHOAMI_PATH, 80);
    println!("after the restart: TCP {after}");
    assert_all_answered(&lab, "TCP through node-a after the restart", &after);
    assert_eq!(
        nodes_of(&after),
        NodeId::ALL.into_iter().collect(),
        "{after}"
    );
    assert_sources("TCP after restart", &after, NodeId::B, NodeId::A.addr());
}

/// `snat_exhausted` from node `id`'s `/metrics`.
fn metric_snat_exhausted(lab: &ClusterLab, id: NodeId) -> u64 {
    let metrics = lab
        .metrics(id)
        .unwrap_or_else(|e| panic!("GET /metrics of {id}: {e:#}"));
    let line = "lb_datapath_total{counter=\"snat_exhausted\"} ";
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{line}` in the /metrics of {id}:\n{metrics}"))
}

/// Opens `n` echo connections through `addr` and checks each answers.
fn hold(lab: &ClusterLab, addr: SocketAddr, n: usize) -> Vec<EchoConn> {
    (0..n)
        .map(|k| {
            let mut conn = lab
                .in_client(move || EchoConn::connect(addr))
                .unwrap()
                .unwrap_or_else(|e| panic!("connection {k}: {e:#}\n{}", lab.agent_logs()));
            conn.ask("hello").unwrap_or_else(|e| {
                panic!("connection {k}: first echo: {e:#}\n{}", lab.agent_logs())
            });
            conn
        })
        .collect()
}

/// A Service without endpoints, in the kind-like topology: each node
/// answers TCP with a RST (the client's connect is refused at once) and UDP
/// with ICMP port unreachable, sent back out of `n0` by TC ingress (no XDP
/// program on the bridge side is needed for that).
#[test]
fn a_service_without_endpoints_is_refused_by_both_nodes() {
    let test = "a_service_without_endpoints_is_refused_by_both_nodes";
    let none = Endpoints {
        a: vec![],
        b: vec![],
    };
    let Some(lab) = lab_with_agents(test, &none, &EchoOptions::default()) else {
        return;
    };
    for node in NodeId::ALL {
        let addr = cluster::nodeport(node);
        let started = std::time::Instant::now();
        let err = try_connect(&lab, addr).expect_err("a connection to a service without endpoints");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "TCP through {node}: {err}\n{}",
            lab.agent_logs()
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused at once"
        );
        let udp = udp_many(&lab, addr, b"hello\n", 3);
        assert_eq!(udp.total(), 3, "{udp}");
        assert!(
            udp.errors.iter().all(|e| e.contains("refused")),
            "UDP through {node}: {udp}\nerrors: {:?}",
            udp.errors
        );
        let st = lab.stats(node).unwrap();
        assert!(
            st["reject_tcp"] >= 1 && st["reject_udp"] >= 3 && st["tc_ingress_packets"] > 0,
            "{node}: {st:?}"
        );
    }
}

/// One TCP connect through `addr` with a 3 s timeout.
fn try_connect(lab: &ClusterLab, addr: SocketAddr) -> std::io::Result<TcpStream> {
    lab.in_client(move || TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
        .unwrap()
}

/// A lab with one endpoint, on node-b, so that every flow through node-a
/// takes one of node-a's four SNAT ports (whatever the NAT map's key), and
/// node-a's agent with short NAT timeouts.
fn tiny_snat_lab(test: &str) -> Option<ClusterLab> {
    let mut lab = lab_or_skip(test, 1, 1)?;
    let only_b = Endpoints {
        a: vec![],
        b: vec![1],
    };
    lab.write_manifest(&only_b, &EchoOptions::default())
        .unwrap();
    lab.start_agent(NodeId::B, &[]).unwrap();
    let args: Vec<String> = [
        "--snat-port-range",
        "61000-61003",
        "--nat-tcp-closed-grace",
        "1",
        "--nat-udp-timeout",
        "2",
        "--gc-interval",
        "1",
    ]
    .map(String::from)
    .to_vec();
    lab.start_agent(NodeId::A, &args).unwrap();
    Some(lab)
}

#[test]
fn snat_port_exhaustion_is_counted_and_recovers() {
    let Some(mut lab) = tiny_snat_lab("snat_port_exhaustion_is_counted_and_recovers") else {
        return;
    };
    let a = cluster::nodeport(NodeId::A);

    let mut conns = hold(&lab, a, 4);
    println!("4 connections through node-a hold the 4 SNAT ports");
    let fifth = try_connect(&lab, a);
    match &fifth {
        Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
            println!("5th connection: {e} (as expected)");
        }
        other => panic!(
            "5th connection with the SNAT range exhausted: expected a connect timeout \
             (SYN dropped), got {other:?}\n{}",
            lab.agent_logs()
        ),
    }
    let stats = lab.stats(NodeId::A).unwrap();
    println!("node-a LB_STATS: {stats:?}");
    let exhausted = stats
        .get("snat_exhausted")
        .copied()
        .unwrap_or_else(|| panic!("no snat_exhausted counter in node-a's LB_STATS: {stats:?}"));
    assert!(
        exhausted > 0,
        "snat_exhausted = 0 after a dropped SYN: {stats:?}"
    );
    let metric = metric_snat_exhausted(&lab, NodeId::A);
    println!("snat_exhausted: LB_STATS {exhausted}, /metrics {metric}");
    assert!(metric > 0, "/metrics shows snat_exhausted = {metric}");
    assert!(
        lab.agent(NodeId::A).unwrap().running(),
        "node-a's agent died:\n{}",
        lab.agent_logs()
    );
    for (k, conn) in conns.iter_mut().enumerate() {
        conn.ask("still there?").unwrap_or_else(|e| {
            panic!(
                "held connection {k} broke during exhaustion: {e:#}\n{}",
                lab.agent_logs()
            )
        });
    }

    // Close the four; after the closed grace (1 s) and a GC round (1 s) the
    // ports are free again.
    drop(conns);
    let start = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match try_connect(&lab, a) {
            Ok(_) => break,
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(20),
                "no new connection through node-a within 20 s of closing the 4 \
                 ({attempts} attempts, last: {e})\n{}",
                lab.agent_logs()
            ),
        }
        thread::sleep(Duration::from_millis(200));
    }
    println!(
        "a new connection succeeded {:.1} s after closing the 4 ({attempts} attempts)",
        start.elapsed().as_secs_f64()
    );
    // Let that probe connection's entry age out too, then all four ports
    // must be usable at once.
    let start = Instant::now();
    let conns = loop {
        thread::sleep(Duration::from_secs(1));
        let conns: Vec<Result<EchoConn, String>> = (0..4)
            .map(|_| {
                lab.in_client(move || EchoConn::connect(a))
                    .unwrap()
                    .map_err(|e| format!("{e:#}"))
            })
            .collect();
        if conns.iter().all(Result::is_ok) {
            break conns;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "4 simultaneous connections through node-a still fail 20 s after the \
             exhaustion ended: {:?}\n{}",
            conns
                .iter()
                .filter_map(|c| c.as_ref().err())
                .collect::<Vec<_>>(),
            lab.agent_logs()
        );
    };
    for (k, conn) in conns.into_iter().enumerate() {
        let mut conn = conn.unwrap();
        let pod = conn
            .ask("again")
            .unwrap_or_else(|e| panic!("recovered connection {k}: {e:#}"));
        assert_eq!(pod, "pod-b1");
    }
    assert!(
        lab.agent(NodeId::A).unwrap().running(),
        "node-a's agent died"
    );
    println!("4 new connections through node-a answered after recovery");
}

#[test]
fn both_nodes_pick_the_same_backend_for_the_same_flow() {
    let test = "both_nodes_pick_the_same_backend_for_the_same_flow";
    let options = EchoOptions {
        load_balancer_ip: Some(cluster::VIP),
        ..EchoOptions::default()
    };
    let Some(lab) = lab_with_agents(test, &Endpoints::all(2), &options) else {
        return;
    };
    let vip = cluster::vip_frontend();
    const PORTS: std::ops::RangeInclusive<u16> = 40_001..=40_060;
    let mut picks: BTreeMap<NodeId, Vec<String>> = BTreeMap::new();
    for node in NodeId::ALL {
        lab.route_vip_via(node).unwrap();
        let answers = lab
            .in_client(move || {
                let mut answers = Vec::new();
                for port in PORTS {
                    let answer = client::udp_ask_from(port, vip, b"hello\n");
                    answers.push(answer.map_err(|e| format!("port {port}: {e:#}")));
                    if answers.iter().filter(|a| a.is_err()).count() >= MAX_ERRORS {
                        break;
                    }
                }
                answers
            })
            .unwrap();
        let failed: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "UDP to {vip} via {node}: {} of {} failed, first {:?}\n{}",
            failed.len(),
            answers.len(),
            failed.first(),
            lab.agent_logs()
        );
        picks.insert(node, answers.into_iter().map(Result::unwrap).collect());
    }
    let (via_a, via_b) = (&picks[&NodeId::A], &picks[&NodeId::B]);
    let differ: Vec<(u16, &String, &String)> = PORTS
        .zip(via_a.iter().zip(via_b))
        .filter(|(_, (x, y))| x != y)
        .map(|(p, (x, y))| (p, x, y))
        .collect();
    let distinct: BTreeSet<&String> = via_a.iter().collect();
    println!(
        "{} client ports to {vip}: via node-a and node-b the same backend for {} ({} \
         distinct backends)",
        via_a.len(),
        via_a.len() - differ.len(),
        distinct.len()
    );
    assert!(
        distinct.len() >= 3,
        "too few backends chosen to compare: {distinct:?}"
    );
    assert!(
        differ.is_empty(),
        "node-a and node-b chose different backends for the same flow \
         (client port, via node-a, via node-b): {differ:?}"
    );
}

/// One datagram from client port `port` to `addr`, one answer awaited for
/// `wait` (no retry).
fn udp_once(
    lab: &ClusterLab,
    port: u16,
    addr: SocketAddr,
    wait: Duration,
) -> std::io::Result<String> {
    lab.in_client(move || -> std::io::Result<String> {
        let socket = std::net::UdpSocket::bind(("0.0.0.0", port))?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(wait))?;
        socket.send(b"hello\n")?;
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .unwrap()
}

#[test]
fn snat_udp_ports_exhausted_then_aged_out() {
    let Some(mut lab) = tiny_snat_lab("snat_udp_ports_exhausted_then_aged_out") else {
        return;
    };
    let a = cluster::nodeport(NodeId::A);
    let wait = Duration::from_secs(1);
    // Four flows (client ports 45001-45004) take the four ports.
    for port in 45_001..=45_004 {
        let answer = udp_once(&lab, port, a, wait)
            .unwrap_or_else(|e| panic!("UDP flow from port {port}: {e}\n{}", lab.agent_logs()));
        assert_eq!(answer, "pod-b1");
    }
    let before = lab.stats(NodeId::A).unwrap()["snat_exhausted"];
    // A fifth, right away (the four are far from their 2 s timeout).
    match udp_once(&lab, 45_005, a, wait) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            println!("5th UDP flow: no answer (as expected)");
        }
        other => panic!(
            "5th UDP flow with the SNAT range exhausted: expected no answer, got {other:?}\n{}",
            lab.agent_logs()
        ),
    }
    let after = lab.stats(NodeId::A).unwrap()["snat_exhausted"];
    println!("snat_exhausted: {before} -> {after}");
    assert!(
        after > before,
        "snat_exhausted did not grow: {before} -> {after}"
    );
    assert!(
        lab.agent(NodeId::A).unwrap().running(),
        "node-a's agent died"
    );

    // After the UDP timeout (2 s) and a GC round (1 s), new flows get ports.
    let start = Instant::now();
    let mut port = 45_100;
    loop {
        port += 1;
        match udp_once(&lab, port, a, wait) {
            Ok(answer) => {
                assert_eq!(answer, "pod-b1");
                break;
            }
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(20),
                "no new UDP flow through node-a answered within 20 s (last: {e})\n{}",
                lab.agent_logs()
            ),
        }
        thread::sleep(Duration::from_millis(200));
    }
    println!(
        "a new UDP flow was answered {:.1} s after the exhaustion",
        start.elapsed().as_secs_f64()
    );
    // Once that one aged out too, four new flows at once.
    thread::sleep(Duration::from_secs(4));
    for port in 45_201..=45_204 {
        let answer = udp_once(&lab, port, a, wait).unwrap_or_else(|e| {
            panic!(
                "UDP flow from port {port} after recovery: {e}\n{}",
                lab.agent_logs()
            )
        });
        assert_eq!(answer, "pod-b1");
    }
    println!("4 new UDP flows through node-a answered after recovery");
}
