//! The agent's HTTP side on the host, on 127.0.0.1: the health-check node
//! ports of `externalTrafficPolicy: Local` services, and the `/metrics`
//! server's isolation from the sync (its own thread, a connection limit and
//! timeouts).

use std::net::SocketAddr;
use std::time::Duration;

use lb_userspace::health::HealthChecks;
use lb_userspace::translate::translate;

mod support;
use support::{free_port, http_get, node_a, parse_str, service, slice};

/// A LoadBalancer service with `externalTrafficPolicy: Local`, its health
/// check on `hc_port`, and one slice with `endpoints` (flow-style items).
fn local_service(hc_port: u16, endpoints: &[&str]) -> String {
    service(
        "d",
        "web",
        "",
        &format!(
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: {hc_port}\n  ports:\n  - {{port: 80, nodePort: 30080}}\n"
        ),
    ) + &slice("d", "web", 8080, endpoints)
}

const LOCAL_READY: &str = "{addresses: [10.1.0.1], nodeName: node-a, conditions: {ready: true}}";
const LOCAL_TERMINATING: &str = "{addresses: [10.1.0.2], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}";
const REMOTE_READY: &str = "{addresses: [10.2.0.1], nodeName: node-b, conditions: {ready: true}}";

/// Health-check answers for `endpoints`: (status, localEndpoints).
fn health_check_answer(endpoints: &[&str]) -> (u16, u64) {
    let port = free_port();
    let objs = parse_str(&local_service(port, endpoints));
    let desired = translate(&objs, &node_a()).unwrap().desired;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut hc = HealthChecks::default();
    rt.block_on(hc.update(&desired));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (code, body) = rt
        .block_on(async move {
            tokio::task::spawn_blocking(move || http_get(addr, "/", Duration::from_secs(5))).await
        })
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    (code, v["localEndpoints"].as_u64().unwrap())
}

#[test]
fn health_check_answers_503_when_every_local_endpoint_is_terminating() {
    // The only local pod is terminating (still serving, so the datapath
    // takes it as a fallback): the load balancer must drain this node.
    assert_eq!(
        health_check_answer(&[LOCAL_TERMINATING, REMOTE_READY]),
        (503, 0)
    );
    assert_eq!(health_check_answer(&[LOCAL_TERMINATING]), (503, 0));
}

#[test]
fn health_check_counts_only_ready_local_endpoints() {
    assert_eq!(
        health_check_answer(&[LOCAL_READY, LOCAL_TERMINATING, REMOTE_READY]),
        (200, 1)
    );
    assert_eq!(health_check_answer(&[REMOTE_READY]), (503, 0));
}
