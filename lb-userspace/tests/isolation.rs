//! One bad object never stops the others: invalid Services and ports,
//! frontends claimed twice, externalIPs that are node addresses and
//! services beyond the maps' capacity are skipped and reported, and every
//! other Service keeps syncing.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use lb_userspace::model::{BackendState, Frontend, FrontendKind, Proto};
use lb_userspace::source::Objects;
use lb_userspace::translate::{
    Capacity, SkipReason, SkippedPart, TranslateOptions, Translation, translate_with,
};

use lb_userspace::agent::Pipeline;
use lb_userspace::health::{HttpLimits, HttpRuntime, Shared};
use lb_userspace::metrics::Metrics;
use lb_userspace::plan::{PlanConfig, frontend_key};
use lb_userspace::writer::memory::MemoryMaps;
use lb_userspace::writer::{MapState, MapWriter, Op};

mod support;
use support::{be, node_a, parse_str, service, slice, spn};

const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

fn tr(objs: &Objects) -> Translation {
    translate_with(objs, &node_a(), &TranslateOptions::default())
}

fn names(t: &Translation) -> Vec<String> {
    t.desired.services.keys().map(|n| n.to_string()).collect()
}

/// (reason, object, field, service ports) of each skipped entry.
fn skipped(t: &Translation) -> Vec<(SkipReason, String, String, Vec<String>)> {
    t.skipped
        .iter()
        .map(|s| {
            (
                s.reason,
                s.object.clone(),
                s.field.clone(),
                s.service_ports.clone(),
            )
        })
        .collect()
}

fn node_port(port: u16) -> Frontend {
    Frontend {
        addr: NODE,
        port,
        proto: Proto::Tcp,
        kind: FrontendKind::NodePort,
    }
}

const READY_A: &str = "{addresses: [10.1.0.1], nodeName: node-a}";

#[test]
fn an_invalid_service_or_port_is_skipped_and_the_others_are_balanced() {
    let objs = parse_str(
        &[
            service(
                "d",
                "good",
                "",
                "  type: NodePort\n  ports:\n  - {port: 80, nodePort: 30080}\n",
            ),
            slice("d", "good", 8080, &[READY_A]),
            service(
                "d",
                "bad-affinity",
                "",
                "  type: NodePort\n  sessionAffinity: Sometimes\n  ports:\n  - {name: a, port: 80, nodePort: 30081}\n  - {name: b, port: 81, nodePort: 30082}\n",
            ),
            service(
                "d",
                "one-bad-port",
                "",
                "  type: NodePort\n  ports:\n  - {name: ok, port: 80, nodePort: 30083}\n  - {name: bad, port: 81, nodePort: 70000}\n",
            ),
        ]
        .concat(),
    );
    let t = tr(&objs);
    assert_eq!(names(&t), ["d/good", "d/one-bad-port:ok"]);
    assert_eq!(
        t.desired.services[&spn("d", "good", "")].backends,
        BTreeSet::from([be([10, 1, 0, 1], 8080, BackendState::Active, "node-a")])
    );
    assert_eq!(
        skipped(&t),
        [
            (
                SkipReason::Invalid,
                "Service d/bad-affinity".into(),
                "spec.sessionAffinity".into(),
                vec!["d/bad-affinity:a".into(), "d/bad-affinity:b".into()]
            ),
            (
                SkipReason::Invalid,
                "Service d/one-bad-port".into(),
                "spec.ports[1].nodePort".into(),
                vec!["d/one-bad-port:bad".into()]
            ),
        ]
    );
    // The report names file, object and field, as errors always did.
    assert_eq!(
        t.skipped[1].to_string(),
        "x.yaml: Service d/one-bad-port: spec.ports[1].nodePort: 70000 is out of range 1-65535"
    );
    assert!(
        t.skipped
            .iter()
            .all(|s| s.part == SkippedPart::ServicePorts)
    );
}

/// The tenant's Service: newer than `prod/web`, in a namespace that sorts
/// first, listing the node's address as an externalIP on web's nodePort.
fn tenant_and_victim(tenant_first: bool) -> Objects {
    let victim = service(
        "prod",
        "web",
        "2024-01-01T00:00:00Z",
        "  type: NodePort\n  ports:\n  - {port: 80, nodePort: 30080}\n",
    ) + &slice("prod", "web", 8080, &[READY_A]);
    let tenant = service(
        "aaa",
        "grab",
        "2025-06-01T00:00:00Z",
        "  type: NodePort\n  externalIPs: [198.18.0.2]\n  ports:\n  - {port: 30080, nodePort: 30999}\n",
    );
    parse_str(&if tenant_first {
        tenant + &victim
    } else {
        victim + &tenant
    })
}

#[test]
fn an_external_ip_that_is_a_node_address_is_refused_and_the_rest_syncs() {
    for tenant_first in [true, false] {
        let t = tr(&tenant_and_victim(tenant_first));
        assert_eq!(names(&t), ["aaa/grab", "prod/web"]);
        assert_eq!(
            t.desired.services[&spn("prod", "web", "")].frontends,
            BTreeSet::from([node_port(30080)])
        );
        // The tenant keeps its own nodePort, not the node's address.
        assert_eq!(
            t.desired.services[&spn("aaa", "grab", "")].frontends,
            BTreeSet::from([node_port(30999)])
        );
        assert_eq!(
            skipped(&t),
            [(
                SkipReason::ExternalIpIsNodeAddress,
                "Service aaa/grab".into(),
                "spec.externalIPs[0]".into(),
                vec!["aaa/grab".into()]
            )]
        );
        assert_eq!(t.skipped[0].part, SkippedPart::Frontend);
    }
}

#[test]
fn a_newer_service_cannot_take_the_frontend_of_an_older_one() {
    // Even when node addresses are allowed as externalIPs, the older
    // Service keeps its frontend, whatever the order of the objects.
    let opts = TranslateOptions {
        allow_external_ip_node_address: true,
        ..Default::default()
    };
    for tenant_first in [true, false] {
        let t = translate_with(&tenant_and_victim(tenant_first), &node_a(), &opts);
        assert_eq!(names(&t), ["prod/web"]);
        assert_eq!(
            t.desired.services[&spn("prod", "web", "")].frontends,
            BTreeSet::from([node_port(30080)])
        );
        assert_eq!(
            skipped(&t),
            [(
                SkipReason::FrontendConflict,
                "Service aaa/grab".into(),
                "spec.externalIPs[0]".into(),
                vec!["aaa/grab".into()]
            )]
        );
        assert_eq!(
            t.skipped[0].message,
            "frontend 198.18.0.2:30080/TCP is already used by prod/web"
        );
    }
}

#[test]
fn without_creation_timestamps_namespace_and_name_decide() {
    let a = service(
        "d",
        "a",
        "",
        "  type: NodePort\n  ports:\n  - {port: 80, nodePort: 30080}\n",
    );
    let b = service(
        "d",
        "b",
        "",
        "  type: NodePort\n  ports:\n  - {port: 81, nodePort: 30080}\n",
    );
    for text in [a.clone() + &b, b + &a] {
        let t = tr(&parse_str(&text));
        assert_eq!(names(&t), ["d/a"]);
        assert_eq!(
            skipped(&t),
            [(
                SkipReason::FrontendConflict,
                "Service d/b".into(),
                "spec.ports[0].nodePort".into(),
                vec!["d/b".into()]
            )]
        );
    }
}

#[test]
fn services_beyond_the_capacity_are_skipped_newest_first() {
    let svc = |name: &str, created: &str, np: u16| {
        service(
            "d",
            name,
            created,
            &format!("  type: NodePort\n  ports:\n  - {{port: 80, nodePort: {np}}}\n"),
        )
    };
    let objs = parse_str(
        &[
            svc("newest", "2025-03-01T00:00:00Z", 30001),
            svc("oldest", "2025-01-01T00:00:00Z", 30002),
            svc("middle", "2025-02-01T00:00:00Z", 30003),
        ]
        .concat(),
    );
    let opts = TranslateOptions {
        capacity: Capacity {
            service_ports: 2,
            ..Capacity::MAPS
        },
        ..Default::default()
    };
    let t = translate_with(&objs, &node_a(), &opts);
    assert_eq!(names(&t), ["d/middle", "d/oldest"]);
    assert_eq!(
        skipped(&t),
        [(
            SkipReason::Capacity,
            "Service d/newest".into(),
            "spec.ports[0]".into(),
            vec!["d/newest".into()]
        )]
    );
}

#[test]
fn external_ips_of_a_cluster_ip_service_are_balanced() {
    let objs = parse_str(
        &[
            service(
                "d",
                "internal",
                "",
                "  clusterIP: 10.96.0.7\n  externalIPs: [192.0.2.7]\n  ports:\n  - {port: 80}\n",
            ),
            slice("d", "internal", 8080, &[READY_A]),
            service(
                "d",
                "typed",
                "",
                "  type: ClusterIP\n  externalIPs: [192.0.2.8]\n  ports:\n  - {port: 80, protocol: UDP}\n",
            ),
            // No externalIPs: nothing for this datapath to balance.
            service("d", "plain", "", "  type: ClusterIP\n  ports:\n  - {port: 80}\n"),
        ]
        .concat(),
    );
    let t = tr(&objs);
    assert_eq!(names(&t), ["d/internal", "d/typed"]);
    let ext = |a: [u8; 4], proto| Frontend {
        addr: a.into(),
        port: 80,
        proto,
        kind: FrontendKind::ExternalIp,
    };
    let internal = &t.desired.services[&spn("d", "internal", "")];
    assert_eq!(
        internal.frontends,
        BTreeSet::from([ext([192, 0, 2, 7], Proto::Tcp)])
    );
    assert_eq!(internal.active_backends().count(), 1);
    assert_eq!(
        t.desired.services[&spn("d", "typed", "")].frontends,
        BTreeSet::from([ext([192, 0, 2, 8], Proto::Udp)])
    );
    assert!(t.skipped.is_empty(), "{:?}", t.skipped);
}

#[test]
fn an_invalid_endpoint_is_left_out_and_its_service_is_balanced() {
    let objs = parse_str(
        &(service(
            "d",
            "a",
            "",
            "  type: NodePort\n  ports:\n  - {port: 80, nodePort: 30080}\n",
        ) + &slice(
            "d",
            "a",
            8080,
            &[READY_A, "{addresses: [10.0.0.999], nodeName: node-a}"],
        )),
    );
    let t = tr(&objs);
    assert_eq!(
        t.desired.services[&spn("d", "a", "")].backends,
        BTreeSet::from([be([10, 1, 0, 1], 8080, BackendState::Active, "node-a")])
    );
    assert_eq!(
        skipped(&t),
        [(
            SkipReason::Invalid,
            "EndpointSlice d/a-x".into(),
            "endpoints[1].addresses[0]".into(),
            vec!["d/a".into()]
        )]
    );
    assert_eq!(t.skipped[0].part, SkippedPart::Endpoints);
}

#[test]
fn the_default_capacity_is_what_the_planner_accepts() {
    use lb_userspace::model::{Desired, ServicePort};
    use lb_userspace::plan::{PlanConfig, plan};
    let mut d = Desired::default();
    for i in 0..Capacity::MAPS.service_ports {
        let sp = ServicePort {
            frontends: [node_port(1 + i as u16)].into(),
            ..Default::default()
        };
        d.services.insert(spn("n", &format!("s{i}"), ""), sp);
    }
    let cfg = PlanConfig::new(251).unwrap();
    assert!(plan(&Default::default(), &d, &cfg).is_ok());
    d.services.insert(
        spn("n", "one-more", ""),
        ServicePort {
            frontends: [node_port(65_000)].into(),
            ..Default::default()
        },
    );
    assert!(plan(&Default::default(), &d, &cfg).is_err());
}

// ------------------------------------------------- through the agent's sync

/// A pipeline over in-memory maps, as the agent runs it, and its HTTP side.
fn pipeline<W: MapWriter>(maps: W) -> (Pipeline<W>, std::sync::Arc<Shared>, HttpRuntime) {
    let http = HttpRuntime::start(HttpLimits::default()).unwrap();
    let shared = std::sync::Arc::new(Shared::new(Metrics::new("/nonexistent".into())));
    let p = Pipeline::new(
        node_a(),
        TranslateOptions::default(),
        PlanConfig::new(251).unwrap(),
        maps,
        shared.clone(),
        http.health_checks(),
    )
    .unwrap();
    (p, shared, http)
}

/// The service port names the maps hold (`LB_SVC_NAMES`).
fn in_maps(maps: &MapState) -> Vec<String> {
    maps.names.values().cloned().collect()
}

/// The value of `series` in the metrics text.
fn metric(shared: &Shared, series: &str) -> Option<String> {
    shared.metrics.encode().lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|v| v.strip_prefix(' '))
            .map(str::to_owned)
    })
}

fn web(endpoints: &[&str]) -> String {
    service(
        "prod",
        "web",
        "2024-01-01T00:00:00Z",
        "  type: NodePort\n  ports:\n  - {port: 80, nodePort: 30080}\n",
    ) + &slice("prod", "web", 8080, endpoints)
}

#[test]
fn a_tenant_service_does_not_freeze_the_sync_of_the_others() {
    let (mut p, shared, _http) = pipeline(MemoryMaps::new());
    p.sync(&parse_str(&web(&[READY_A]))).unwrap();
    // A tenant lists the node's address as an externalIP on web's nodePort,
    // another one asks for web's nodePort; web scales up meanwhile.
    let tenants = [
        service(
            "aaa",
            "grab",
            "2025-06-01T00:00:00Z",
            "  type: NodePort\n  externalIPs: [198.18.0.2]\n  ports:\n  - {port: 30080, nodePort: 30999}\n",
        ),
        service(
            "aaa",
            "same-port",
            "2025-06-02T00:00:00Z",
            "  type: NodePort\n  ports:\n  - {port: 80, nodePort: 30080}\n",
        ),
    ]
    .concat();
    let scaled = web(&[READY_A, "{addresses: [10.1.0.2], nodeName: node-a}"]) + &tenants;
    p.sync(&parse_str(&scaled)).unwrap();
    let maps = p.maps().read_state().unwrap();
    assert_eq!(in_maps(&maps), ["prod/web", "aaa/grab"]);
    let sid = maps.frontends[&frontend_key(NODE, 30080, Proto::Tcp)].service_id;
    assert_eq!(maps.names[&sid], "prod/web");
    assert_eq!(
        maps.backends
            .values()
            .filter(|b| b.service_id == sid)
            .count(),
        2
    );
    for (reason, n) in [
        ("invalid", "0"),
        ("frontend_conflict", "1"),
        ("external_ip_is_node_address", "1"),
        ("capacity", "0"),
    ] {
        let series = format!("lb_skipped_service_ports{{reason=\"{reason}\"}}");
        assert_eq!(metric(&shared, &series).as_deref(), Some(n), "{series}");
    }
    let listed: Vec<(String, String)> = shared
        .skipped
        .read()
        .unwrap()
        .iter()
        .map(|s| (s.object.clone(), s.reason.name().to_owned()))
        .collect();
    assert_eq!(
        listed,
        [
            (
                "Service aaa/grab".into(),
                "external_ip_is_node_address".into()
            ),
            ("Service aaa/same-port".into(), "frontend_conflict".into()),
        ]
    );
    assert_eq!(
        metric(&shared, "lb_syncs_total{result=\"ok\"}").as_deref(),
        Some("2")
    );
    // Once the tenants are gone, nothing is reported any more.
    p.sync(&parse_str(&web(&[READY_A]))).unwrap();
    assert_eq!(
        metric(
            &shared,
            "lb_skipped_service_ports{reason=\"frontend_conflict\"}"
        )
        .as_deref(),
        Some("0")
    );
    assert!(shared.skipped.read().unwrap().is_empty());
}

/// Each frontend with its service's name and backends, ids replaced by names.
fn named(maps: &MapState) -> Vec<(String, String, Vec<[u8; 4]>)> {
    maps.frontends
        .iter()
        .map(|(k, v)| {
            let backends = maps
                .backends
                .values()
                .filter(|b| b.service_id == v.service_id)
                .map(|b| b.addr)
                .collect();
            (
                format!("{:?}:{}", k.addr, u16::from_be(k.port_be)),
                maps.names[&v.service_id].clone(),
                backends,
            )
        })
        .collect()
}

/// In-memory maps whose first `apply` stops with an error after `after` ops,
/// as a map update refused by the kernel would.
struct FailOnce {
    maps: MemoryMaps,
    after: Option<usize>,
}

impl MapWriter for FailOnce {
    fn apply(&mut self, ops: &[Op]) -> lb_userspace::error::Result<()> {
        match self.after.take() {
            Some(n) if n < ops.len() => {
                self.maps.apply(&ops[..n])?;
                Err(lb_userspace::error::Error::Datapath(
                    "map update refused".into(),
                ))
            }
            _ => self.maps.apply(ops),
        }
    }

    fn read_state(&self) -> lb_userspace::error::Result<MapState> {
        self.maps.read_state()
    }
}

#[test]
fn a_sync_tried_again_after_a_failed_write_completes_the_maps() {
    let objs = parse_str(
        &[
            web(&[READY_A]),
            service(
                "d",
                "other",
                "",
                "  type: NodePort\n  ports:\n  - {port: 80, nodePort: 30081}\n",
            ),
        ]
        .concat(),
    );
    let (mut p, shared, _http) = pipeline(FailOnce {
        maps: MemoryMaps::new(),
        after: Some(2),
    });
    assert!(p.sync(&objs).is_err());
    assert_eq!(
        metric(&shared, "lb_syncs_total{result=\"error\"}").as_deref(),
        Some("1")
    );
    // What the agent's retry does: the same objects again.
    p.sync(&objs).unwrap();
    let (mut fresh, _, _http2) = pipeline(MemoryMaps::new());
    fresh.sync(&objs).unwrap();
    // The same services, frontends and backends as a sync that never
    // failed (ids may differ), and nothing dangling.
    p.maps().maps.check_references().unwrap();
    assert_eq!(named(&p.maps().maps), named(fresh.maps()));
    assert_eq!(
        in_maps(&p.maps().read_state().unwrap()),
        ["d/other", "prod/web"]
    );
}
