//! End-to-end tests: lb-agent attached in a network-namespace lab, real
//! traffic from a client namespace. They need root and BPF, and run one at a
//! time (`cargo test -p xtask --test e2e -- --test-threads=1`); `cargo xtask
//! test` runs them with `LB_AGENT_BIN` set to a fresh build.
//!
//! Without root they print SKIPPED and pass, except under CI, where they
//! fail. Each test builds its own lab (names carry the pid and a counter),
//! so they also survive a parallel run.

use std::{
    collections::BTreeSet,
    io::{ErrorKind, Write as _},
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use xtask::lab::{
    self, Lab,
    agent::REJECTED,
    client::{self, EchoConn, Tally},
    manifest, pins,
};

/// Builds a lab with `pods` pods, or returns `None` (after saying why) when
/// the test cannot run here.
fn lab_or_skip(test: &str, pods: u8) -> Option<Lab> {
    if !xtask::is_root() {
        if xtask::is_ci() {
            panic!("{test}: CI is set but the e2e tests are not running as root");
        }
        // Straight to the stderr handle: the test harness captures
        // `eprintln!`, and this line must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "\n!!! SKIPPED {test}: needs root (network namespaces, XDP). \
             Run `sudo -E cargo xtask test`. !!!\n"
        );
        return None;
    }
    Some(Lab::new(pods).unwrap_or_else(|e| panic!("{test}: building the lab: {e:#}")))
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

/// Asserts that every request was answered.
fn assert_all_answered(what: &str, tally: &Tally) {
    assert!(
        tally.errors.is_empty() && tally.total() > 0,
        "{what}: {tally}\nerrors: {:#?}",
        tally.errors.iter().take(10).collect::<Vec<_>>()
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
    let Some(mut lab) = lab_or_skip("nodeport_spread_tcp_udp", 3) else {
        return;
    };
    lab.write_manifest(&[1, 2, 3]).unwrap();
    lab.start_agent().unwrap();

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
    let Some(mut lab) = lab_or_skip("long_lived_connection_survives_backend_changes", 3) else {
        return;
    };
    lab.write_manifest(&[1, 2, 3]).unwrap();
    lab.start_agent().unwrap();

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
    let stop = Arc::new(AtomicBool::new(false));
    let talker = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut answers = Vec::new();
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) && n < 1_000 {
                n += 1;
                let at = Instant::now();
                answers.push(conn.ask(&format!("line {n}")).map_err(|e| format!("{e:#}")));
                thread::sleep(Duration::from_millis(100).saturating_sub(at.elapsed()));
            }
            answers
        })
    };

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

    stop.store(true, Ordering::SeqCst);
    let answers = talker.join().expect("talker thread");
    let errors: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    let pods: BTreeSet<&String> = answers.iter().filter_map(|a| a.as_ref().ok()).collect();
    println!(
        "long-lived connection: {} exchanges, {} errors, answered by {pods:?}",
        answers.len(),
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "the long-lived connection broke: {errors:?}"
    );
    assert!(answers.len() >= 30, "only {} exchanges", answers.len());
    assert_eq!(
        pods.into_iter().collect::<Vec<_>>(),
        vec![&serving],
        "the long-lived connection moved"
    );

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

    // The XDP program is attached where the traffic arrives.
    let link = xtask::cmd::output(std::process::Command::new(xtask::cmd::program("ip")).args([
        "-n",
        lab.node().name(),
        "-d",
        "link",
        "show",
        lab::NODE_IFACE,
    ]))
    .unwrap();
    assert!(link.contains("xdp"), "no XDP program on n0:\n{link}");

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
    let Some(mut lab) = lab_or_skip("reload_with_bad_manifest_keeps_state", 3) else {
        return;
    };
    lab.write_manifest(&[1, 2, 3]).unwrap();
    lab.start_agent().unwrap();
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
