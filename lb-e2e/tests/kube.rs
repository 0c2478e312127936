//! The agent against Kubernetes: the real kube-rs client in `lb-agent`
//! watches the API-server double (`lb_testkit::apiserver`, started inside the
//! node namespace), and real traffic from the client namespace checks what
//! the datapath does after each change. Needs root (`cargo xtask test` runs
//! it with `--test-threads=1`).

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use lb_testkit::{
    apiserver::{ApiServer, Kind, Store},
    lab::{
        self, Lab,
        agent::AgentSource,
        client::{self, EchoConn, Tally},
    },
};
use serde_json::json;

/// One endpoint of the `demo/echo` slice.
#[derive(Clone, Copy)]
struct Ep {
    pod: u8,
    node: &'static str,
    ready: bool,
    serving: bool,
    terminating: bool,
}

fn ready(pod: u8) -> Ep {
    Ep {
        pod,
        node: "node-a",
        ready: true,
        serving: true,
        terminating: false,
    }
}

fn terminating(pod: u8) -> Ep {
    Ep {
        ready: false,
        serving: true,
        terminating: true,
        ..ready(pod)
    }
}

/// `demo/echo`: NodePort 30090 (TCP `http` and UDP `echo-udp`), plus
/// `extra` spec fields.
fn service(extra: serde_json::Value) -> Service {
    let mut spec = json!({
        "type": "NodePort",
        "clusterIP": "10.96.0.10",
        "ports": [
            {"name": "http", "protocol": "TCP", "port": 80, "nodePort": 30090, "targetPort": 8080},
            {"name": "echo-udp", "protocol": "UDP", "port": 80, "nodePort": 30090, "targetPort": 8080}
        ]
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        spec[k] = v.clone();
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo", "namespace": "demo"},
        "spec": spec,
    }))
    .unwrap()
}

fn slice(eps: &[Ep]) -> EndpointSlice {
    let endpoints: Vec<_> = eps
        .iter()
        .map(|e| {
            json!({
                "addresses": [lab::pod_addr(e.pod).to_string()],
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                "nodeName": e.node,
            })
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "echo-abc12", "namespace": "demo",
                     "labels": {"kubernetes.io/service-name": "echo"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080},
                  {"name": "echo-udp", "protocol": "UDP", "port": 8080}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn node() -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a"},
        "status": {"addresses": [{"type": "InternalIP", "address": lab::NODE_ADDR.to_string()}]},
    }))
    .unwrap()
}

/// A lab whose agent watches an API-server double inside the node namespace.
struct Cluster {
    /// The pass-through XDP program on the client's veth, so it receives
    /// XDP_TX rejects.
    _pass: aya::Ebpf,
    lab: Lab,
    api: Option<ApiServer>,
    store: Store,
    kubeconfig: std::path::PathBuf,
}

impl Cluster {
    fn new(test: &str, pods: u8) -> Option<Self> {
        if !lb_testkit::guard::can_run_as_root(test) {
            return None;
        }
        let lab = Lab::new(pods).unwrap_or_else(|e| panic!("{test}: lab: {e:#}"));
        let pass = lab
            .in_client(|| lb_testkit::xdp_pass::attach("c0").map_err(|e| format!("{e:#}")))
            .unwrap()
            .expect("the pass-through XDP program on the client veth");
        let api = lab
            .node()
            .run(|| ApiServer::start("127.0.0.1:0".parse().unwrap()))
            .unwrap()
            .expect("API-server double");
        let store = api.store().clone();
        let kubeconfig = lab.dir().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        store.apply(&node()).unwrap();
        Some(Self {
            _pass: pass,
            lab,
            api: Some(api),
            store,
            kubeconfig,
        })
    }

    fn start_agent(&mut self, extra: &[String]) {
        let kc = self.kubeconfig.clone();
        self.lab
            .start_agent_from(AgentSource::Kubeconfig(&kc), extra)
            .unwrap();
    }

    fn stop_api(&mut self) {
        self.api.as_mut().unwrap().stop();
    }

    /// Restarts the double on the same port, from inside the node namespace.
    fn restart_api(&mut self) {
        let mut api = self.api.take().unwrap();
        let api = self
            .lab
            .node()
            .run(move || api.restart().map(|()| api))
            .unwrap()
            .expect("restart the API-server double");
        self.api = Some(api);
    }

    fn http(&self, n: usize) -> Tally {
        let addr = lab::frontend();
        self.lab
            .in_client(move || Tally::collect(n, || client::http_get(addr)))
            .unwrap()
    }

    fn udp(&self, n: usize) -> Tally {
        let addr = lab::frontend();
        self.lab
            .in_client(move || Tally::collect(n, || client::udp_ask(addr)))
            .unwrap()
    }

    /// Repeats `n` HTTP requests until `ok` holds for the tally (the agent
    /// converges asynchronously), for at most 10 s; returns the last tally.
    fn until(&self, what: &str, n: usize, ok: impl Fn(&Tally) -> bool) -> Tally {
        let start = Instant::now();
        loop {
            let t = self.http(n);
            if ok(&t) {
                println!("{what}: {t} (after {:?})", start.elapsed());
                return t;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{what}: not reached in 10 s; last: {t}\nagent log:\n{}",
                self.lab_log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn lab_log(&self) -> String {
        std::fs::read_to_string(self.lab.dir().join("lb-agent.log")).unwrap_or_default()
    }
}

fn pods_of(t: &Tally, max: u8) -> BTreeSet<u8> {
    (1..=max)
        .filter(|&i| t.count(&lab::pod_label(i)) > 0)
        .collect()
}

fn only(t: &Tally, pods: &[u8], max: u8) -> bool {
    t.answered() == t.total() && pods_of(t, max) == pods.iter().copied().collect()
}

/// TCP connect to the NodePort is refused (RST), not timed out.
fn refused(c: &Cluster) -> bool {
    let addr = lab::frontend();
    c.lab
        .in_client(
            move || match std::net::TcpStream::connect_timeout(&addr, client::TIMEOUT) {
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
                Ok(_) => false,
            },
        )
        .unwrap()
}

#[test]
fn service_created_scaled_and_readiness_flipped() {
    let Some(mut c) = Cluster::new("service_created_scaled_and_readiness_flipped", 5) else {
        return;
    };
    c.store.apply(&service(json!({}))).unwrap();
    c.store
        .apply(&slice(&[ready(1), ready(2), ready(3)]))
        .unwrap();
    c.start_agent(&[]);
    c.until("3 endpoints", 60, |t| only(t, &[1, 2, 3], 5));
    let udp = c.udp(30);
    assert_eq!(udp.answered(), 30, "UDP: {udp}");

    c.store
        .apply(&slice(&[ready(1), ready(2), ready(3), ready(4), ready(5)]))
        .unwrap();
    c.until("scaled to 5", 80, |t| only(t, &[1, 2, 3, 4, 5], 5));
    c.store.apply(&slice(&[ready(2)])).unwrap();
    c.until("scaled to 1", 20, |t| only(t, &[2], 5));

    // Readiness flip: not ready (and not serving) → no usable endpoint →
    // new connections are refused with a RST; ready again → served.
    c.store
        .apply(&slice(&[Ep {
            ready: false,
            serving: false,
            ..ready(2)
        }]))
        .unwrap();
    let start = Instant::now();
    while !refused(&c) {
        assert!(start.elapsed() < Duration::from_secs(10), "never refused");
        thread::sleep(Duration::from_millis(100));
    }
    let addr = lab::frontend();
    let udp_refused = c
        .lab
        .in_client(move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(client::TIMEOUT)).unwrap();
            s.connect(addr).unwrap();
            s.send(b"anyone?").unwrap();
            s.recv(&mut [0u8; 64]).map_err(|e| e.kind())
        })
        .unwrap();
    assert_eq!(
        udp_refused,
        Err(std::io::ErrorKind::ConnectionRefused),
        "UDP must get ICMP port unreachable"
    );
    c.store.apply(&slice(&[ready(2)])).unwrap();
    c.until("ready again", 20, |t| only(t, &[2], 5));

    // Deleting the service: its NodePort refuses.
    c.store.delete(Kind::Service, "demo", "echo");
    c.store.delete(Kind::EndpointSlice, "demo", "echo-abc12");
    let start = Instant::now();
    while !refused(&c) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "deleted service still answers"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn terminating_endpoints_keep_their_flows_and_serve_when_nothing_else_can() {
    let Some(mut c) = Cluster::new("terminating_endpoints", 2) else {
        return;
    };
    c.store.apply(&service(json!({}))).unwrap();
    c.store.apply(&slice(&[ready(1), ready(2)])).unwrap();
    c.start_agent(&[]);
    c.until("2 endpoints", 40, |t| only(t, &[1, 2], 2));

    let addr = lab::frontend();
    let mut conn = c
        .lab
        .in_client(move || EchoConn::connect(addr))
        .unwrap()
        .unwrap();
    let serving = conn.ask("hi").unwrap();
    let x: u8 = serving.trim_start_matches("pod-").parse().unwrap();
    let y = 3 - x;

    // x terminates while y is ready: new flows go to y only, x keeps its flow.
    c.store.apply(&slice(&[terminating(x), ready(y)])).unwrap();
    c.until("terminating pod gets no new flow", 40, |t| only(t, &[y], 2));
    assert_eq!(
        conn.ask("still there?").unwrap(),
        serving,
        "established flow moved"
    );

    // Only terminating endpoints left (y gone): they take new flows (KEP-1669).
    c.store.apply(&slice(&[terminating(x)])).unwrap();
    c.until("only terminating left", 20, |t| only(t, &[x], 2));
    assert_eq!(conn.ask("and now?").unwrap(), serving);
}

#[test]
fn traffic_policy_local_health_check_and_affinity() {
    let Some(mut c) = Cluster::new("traffic_policy_local_health_check_and_affinity", 3) else {
        return;
    };
    let lb = json!({
        "type": "LoadBalancer",
        "externalTrafficPolicy": "Local",
        "healthCheckNodePort": 32000,
    });
    c.store.apply(&service(lb.clone())).unwrap();
    // pod-3 is "on node-b": with eTP Local only the local pods serve.
    let remote = Ep {
        node: "node-b",
        ..ready(3)
    };
    c.store
        .apply(&slice(&[ready(1), ready(2), remote]))
        .unwrap();
    c.start_agent(&[]);
    c.until("eTP Local: local pods only", 40, |t| only(t, &[1, 2], 3));

    let hc = SocketAddr::from((lab::NODE_ADDR, 32000));
    let health = |c: &Cluster| {
        c.lab
            .in_client(move || client::http_get_path(hc, "/"))
            .unwrap()
    };
    let body = health(&c).expect("healthCheckNodePort answers 200");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["localEndpoints"], 2, "{body}");
    assert_eq!(v["service"]["name"], "echo");

    // No local endpoint left: the health check says 503, the NodePort drops
    // (kube-proxy's behaviour for eTP Local: the load balancer steers away).
    c.store
        .apply(&slice(&[
            Ep {
                node: "node-b",
                ..ready(1)
            },
            remote,
        ]))
        .unwrap();
    let start = Instant::now();
    loop {
        match health(&c) {
            Err(e) if format!("{e:#}").contains("503") => break,
            _ => {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "health check never said 503"
                );
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let t = c.http(3);
    assert_eq!(
        t.answered(),
        0,
        "eTP Local without local endpoints must drop: {t}"
    );

    // Back to Cluster with session affinity: every flow of this client
    // lands on one pod. (pod-3 leaves: in this one-node lab a "node-b" pod
    // is not behind another node, so it cannot be forwarded to.)
    let mut cluster = lb.clone();
    cluster["externalTrafficPolicy"] = json!("Cluster");
    cluster["sessionAffinity"] = json!("ClientIP");
    cluster["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 3}});
    c.store.apply(&service(cluster)).unwrap();
    c.store.apply(&slice(&[ready(1), ready(2)])).unwrap();
    let t = c.until("affinity", 30, |t| {
        t.answered() == 30 && pods_of(t, 3).len() == 1
    });
    let pinned = pods_of(&t, 3);
    let again = c.http(30);
    assert_eq!(pods_of(&again, 3), pinned, "affinity did not hold: {again}");
    // 60 flows on one pod: by chance 2 × 2⁻⁶⁰.

    // Expiry: after the 3 s timeout the client's next flow is balanced by
    // Maglev, not by affinity (the datapath's `affinity_hits` stays put),
    // and the flow after it is held by affinity again.
    let metrics = SocketAddr::from((lab::NODE_ADDR, 9995));
    let affinity_hits = |c: &Cluster| -> u64 {
        let text = c
            .lab
            .in_client(move || client::http_get_path(metrics, "/metrics"))
            .unwrap()
            .expect("/metrics");
        text.lines()
            .find(|l| l.starts_with("lb_datapath_total{counter=\"affinity_hits\"} "))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no affinity_hits in /metrics:\n{text}"))
    };
    thread::sleep(Duration::from_millis(3_300));
    let before = affinity_hits(&c);
    let expired = c.http(1);
    assert_eq!(expired.answered(), 1, "{expired}");
    assert_eq!(
        affinity_hits(&c),
        before,
        "a flow after the timeout used affinity"
    );
    let held = c.http(1);
    assert_eq!(held.answered(), 1, "{held}");
    assert_eq!(affinity_hits(&c), before + 1, "affinity not re-established");
}

#[test]
fn api_server_outage_keeps_traffic_and_converges_after() {
    let Some(mut c) = Cluster::new("api_server_outage", 3) else {
        return;
    };
    c.store.apply(&service(json!({}))).unwrap();
    c.store.apply(&slice(&[ready(1), ready(2)])).unwrap();
    c.start_agent(&[]);
    c.until("before the outage", 40, |t| only(t, &[1, 2], 3));
    let lists_before = c.store.list_requests(Kind::EndpointSlice);

    c.stop_api();
    let start = Instant::now();
    let mut seen = BTreeSet::new();
    while start.elapsed() < Duration::from_secs(10) {
        // Each batch: every request answered, by pod-1 or pod-2 only (one
        // batch of 10 may land on a single pod: 2 × 2⁻¹⁰ per batch, so
        // both pods are asserted over the whole outage, not per batch).
        let t = c.http(10);
        let pods = pods_of(&t, 3);
        assert!(
            t.answered() == t.total() && pods.is_subset(&BTreeSet::from([1, 2])),
            "traffic during the outage: {t}"
        );
        seen.extend(pods);
        thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        seen,
        BTreeSet::from([1, 2]),
        "both pods serve during the outage"
    );
    // Changes while the API server is away, then it comes back with its
    // history gone: the agent re-lists and converges.
    c.store.apply(&slice(&[ready(2), ready(3)])).unwrap();
    c.store.expire_history();
    c.restart_api();
    c.until("converged after the outage", 40, |t| only(t, &[2, 3], 3));
    assert!(
        c.store.list_requests(Kind::EndpointSlice) > lists_before,
        "the agent did not re-list"
    );
}

#[test]
fn restarted_agent_serves_pinned_state_and_deletes_nothing_before_first_sync() {
    let Some(mut c) = Cluster::new("restarted_agent_before_first_sync", 3) else {
        return;
    };
    c.store.apply(&service(json!({}))).unwrap();
    c.store
        .apply(&slice(&[ready(1), ready(2), ready(3)]))
        .unwrap();
    let keep = ["--keep-datapath-on-exit".to_string()];
    c.start_agent(&keep);
    c.until("before", 60, |t| only(t, &[1, 2, 3], 3));
    let addr = lab::frontend();
    let mut conn = c
        .lab
        .in_client(move || EchoConn::connect(addr))
        .unwrap()
        .unwrap();
    let serving = conn.ask("hi").unwrap();

    // Kill the agent and take the API server away: the new agent cannot
    // list, so it must keep serving what the pinned maps hold.
    c.lab.kill_agent().unwrap();
    c.stop_api();
    let kc = c.kubeconfig.clone();
    // Start without waiting for a sync (there cannot be one yet).
    c.lab
        .spawn_agent_from(AgentSource::Kubeconfig(&kc), &keep)
        .unwrap();
    thread::sleep(Duration::from_secs(2));
    let t = c.http(30);
    assert!(only(&t, &[1, 2, 3], 3), "before the first sync: {t}");
    assert_eq!(conn.ask("still?").unwrap(), serving);
    let frontends = c.lab.bpftool_dump(lab::pins::FRONTENDS_V4, true).unwrap();
    assert!(
        frontends.contains("service_id"),
        "frontends were deleted: {frontends}"
    );

    // The API server returns with a change: the agent syncs and converges.
    c.store.apply(&slice(&[ready(1), ready(3)])).unwrap();
    c.restart_api();
    c.until("after the first sync", 40, |t| only(t, &[1, 3], 3));
    if serving != "pod-2" {
        assert_eq!(conn.ask("after").unwrap(), serving);
    }
}
