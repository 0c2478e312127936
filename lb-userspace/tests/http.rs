//! The agent's HTTP side on the host, on 127.0.0.1: the health-check node
//! ports of `externalTrafficPolicy: Local` services, and the `/metrics`
//! server's isolation from the sync (its own thread, a connection limit and
//! timeouts).

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use lb_userspace::health::{HttpLimits, HttpRuntime, Shared};
use lb_userspace::metrics::Metrics;
use lb_userspace::translate::translate;

mod support;
use support::{free_port, http_get, node_a, parse_str, service, slice};

fn shared() -> Arc<Shared> {
    Arc::new(Shared::new(Metrics::new("/nonexistent".into())))
}

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
    let http = HttpRuntime::start(HttpLimits::default()).unwrap();
    let mut hc = http.health_checks();
    hc.update(&desired);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (code, body) = http_get(addr, "/", Duration::from_secs(5)).unwrap();
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

#[test]
fn http_answers_while_the_agent_thread_is_busy() {
    // The agent's runtime runs the sync and the watchers; a long sync must
    // not stop /healthz, /readyz and the health checks from answering, and
    // a slow scrape must not stop the sync: they do not share a thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let http = HttpRuntime::start(HttpLimits::default()).unwrap();
    let addr = rt
        .block_on(async { http.serve(([127, 0, 0, 1], 0).into(), shared()) })
        .unwrap();
    let client = std::thread::spawn(move || http_get(addr, "/healthz", Duration::from_secs(2)));
    // A sync that keeps the agent's thread for 3 s.
    rt.block_on(async { std::thread::sleep(Duration::from_secs(3)) });
    let (code, body) = client
        .join()
        .unwrap()
        .expect("/healthz answered during the sync");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
}

/// A client that connects and sends half a request, holding the connection.
fn hold(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    s
}

#[test]
fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let limits = HttpLimits {
        max_connections: 2,
        idle_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let http = HttpRuntime::start(limits).unwrap();
    let addr = http.serve(([127, 0, 0, 1], 0).into(), shared()).unwrap();
    let held = [hold(addr), hold(addr)];
    // The third is queued, not served, while both slots are held...
    let waiting = std::thread::spawn(move || http_get(addr, "/healthz", Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!waiting.is_finished(), "a third connection was served");
    // ...and served as soon as one is released.
    drop(held);
    let (code, _) = waiting.join().unwrap().unwrap();
    assert_eq!(code, 200);
}

#[test]
fn an_idle_connection_is_closed_and_frees_its_slot() {
    let limits = HttpLimits {
        max_connections: 1,
        idle_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let http = HttpRuntime::start(limits).unwrap();
    let addr = http.serve(([127, 0, 0, 1], 0).into(), shared()).unwrap();
    let mut held = hold(addr);
    // The only slot is held by a client that never finishes its request;
    // the server closes it, and the next client is served.
    let (code, _) = http_get(addr, "/healthz", Duration::from_secs(10)).unwrap();
    assert_eq!(code, 200);
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    // Closed by the server (a read timeout here would be an error).
    std::io::Read::read_to_end(&mut held, &mut buf).expect("the server closed it");
    assert!(
        buf.is_empty() || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"),
        "{buf:?}"
    );
}

#[test]
fn skipped_objects_are_listed_as_json() {
    use lb_userspace::translate::{NodeContext, TranslateOptions, translate_with};
    let objs = parse_str(&service(
        "d",
        "a",
        "",
        "  type: NodePort\n  sessionAffinity: Sometimes\n  ports:\n  - {port: 80, nodePort: 30080}\n",
    ));
    let t = translate_with(&objs, &NodeContext::default(), &TranslateOptions::default());
    let shared = shared();
    *shared.skipped.write().unwrap() = t.skipped;
    let http = HttpRuntime::start(HttpLimits::default()).unwrap();
    let addr = http.serve(([127, 0, 0, 1], 0).into(), shared).unwrap();
    let (code, body) = http_get(addr, "/skipped", Duration::from_secs(5)).unwrap();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!([{
            "reason": "invalid",
            "part": "service_ports",
            "object": "Service d/a",
            "file": "x.yaml",
            "field": "spec.sessionAffinity",
            "message": "unknown value \"Sometimes\" (None or ClientIP)",
            "servicePorts": ["d/a"],
        }])
    );
}
