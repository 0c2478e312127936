//! The agent's pipeline on the host: manifests → translate → plan → the
//! in-memory maps, and the datapath's choice read back through
//! `MemoryMaps::resolve`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;

use lb_common::{
    BACKEND_ACTIVE, BACKEND_F_LOCAL, BACKEND_TERMINATING, FRONTEND_NODEPORT, FrontendKeyV4,
};
use lb_userspace::model::{
    Backend, BackendState, Desired, Frontend, FrontendKind, Proto, ServicePort, ServicePortName,
};
use lb_userspace::plan::{PlanConfig, frontend_key, plan};
use lb_userspace::source::manifests;
use lb_userspace::translate::{Translation, translate};
use lb_userspace::writer::memory::MemoryMaps;
use lb_userspace::writer::{MapWriter, Op};
use proptest::prelude::*;

mod support;
use support::{be, node_a, parse_str, spn, testdata};

fn load_and_translate(name: &str) -> Translation {
    let objs = manifests::load(&testdata(name)).unwrap();
    translate(&objs, &node_a()).unwrap()
}

// ---------------------------------------------------------------- sources

#[test]
fn list_is_loaded_with_origins() {
    let objs = manifests::load(&testdata("list.yaml")).unwrap();
    assert_eq!(objs.services.len(), 5);
    assert_eq!(objs.slices.len(), 4);
    assert!(
        objs.origins
            .values()
            .all(|p| p.ends_with("testdata/list.yaml"))
    );
}

#[test]
fn directory_reads_yaml_and_json_in_order() {
    let objs = manifests::load(&testdata("dir")).unwrap();
    assert_eq!(objs.services.len(), 1);
    assert_eq!(objs.slices.len(), 1);
    let t = translate(&objs, &node_a()).unwrap();
    let sp = &t.desired.services[&spn("team", "api", "grpc")];
    assert_eq!(
        sp.backends
            .iter()
            .map(|b| (b.addr, b.port))
            .collect::<Vec<_>>(),
        [(Ipv4Addr::new(10, 3, 0, 1), 9001)]
    );
}

#[test]
fn bad_yaml_names_the_file() {
    let e = manifests::load(&testdata("bad-syntax.yaml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("testdata/bad-syntax.yaml: invalid YAML"), "{e}");
}

#[test]
fn wrong_field_type_names_file_object_and_path() {
    let e = manifests::load(&testdata("bad-type.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "testdata/bad-type.yaml: Service default/api: spec.ports[0].nodePort: invalid type"
        ),
        "{e}"
    );
}

#[test]
fn a_bad_file_in_a_directory_loads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(testdata("list.yaml"), dir.path().join("a.yaml")).unwrap();
    std::fs::copy(testdata("bad-syntax.yaml"), dir.path().join("b.yaml")).unwrap();
    let e = manifests::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("b.yaml: invalid YAML"), "{e}");
}

#[test]
fn missing_path_is_an_io_error() {
    let e = manifests::load(&testdata("nope.yaml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.yaml"), "{e}");
}

// ------------------------------------------------------------ translation

#[test]
fn translation_follows_kube_proxy() {
    let t = load_and_translate("list.yaml");
    let names: Vec<String> = t.desired.services.keys().map(|n| n.to_string()).collect();
    // ClusterIP, headless and other-proxy services are skipped; SCTP too.
    assert_eq!(
        names,
        [
            "shop/db",
            "shop/web:dns-tcp",
            "shop/web:dns-udp",
            "shop/web:http"
        ]
    );

    let http = &t.desired.services[&spn("shop", "web", "http")];
    let fe = |a: [u8; 4], port, proto, kind| Frontend {
        addr: a.into(),
        port,
        proto,
        kind,
    };
    assert_eq!(
        http.frontends,
        BTreeSet::from([
            fe([198, 18, 0, 2], 31080, Proto::Tcp, FrontendKind::NodePort),
            fe(
                [203, 0, 113, 10],
                80,
                Proto::Tcp,
                FrontendKind::LoadBalancer
            ),
            fe([192, 0, 2, 50], 80, Proto::Tcp, FrontendKind::ExternalIp),
        ])
    );
    // Two slices merged, 10.1.0.2 once; not-serving left out; the serving
    // terminating one kept as Terminating (ready ones exist); remote kept.
    use BackendState::*;
    assert_eq!(
        http.backends,
        BTreeSet::from([
            be([10, 1, 0, 1], 8080, Active, "node-a"),
            be([10, 1, 0, 2], 8080, Active, "node-a"),
            be([10, 1, 0, 4], 8080, Terminating, "node-a"),
            be([10, 2, 0, 1], 8080, Active, "node-b"),
            be([10, 2, 0, 2], 8080, Active, "node-b"),
        ])
    );

    // TCP and UDP on the same port number are two service ports.
    let tcp = &t.desired.services[&spn("shop", "web", "dns-tcp")];
    let udp = &t.desired.services[&spn("shop", "web", "dns-udp")];
    assert!(tcp.frontends.iter().all(|f| f.proto == Proto::Tcp));
    assert!(udp.frontends.iter().all(|f| f.proto == Proto::Udp));
    assert_eq!(tcp.backends.len(), 3); // only in web-aaaaa
    assert_eq!(udp.backends.len(), 5);

    // No ready endpoint: the serving terminating one takes new flows.
    let db = &t.desired.services[&spn("shop", "db", "")];
    assert_eq!(
        db.backends,
        BTreeSet::from([be([10, 1, 0, 20], 5432, Active, "node-a")])
    );

    assert_eq!(
        t.warnings,
        ["shop/web:sctp: SCTP is not supported; port skipped",]
    );
}

#[test]
fn out_of_range_node_port_names_file_object_and_field() {
    let objs = manifests::load(&testdata("bad-nodeport.yaml")).unwrap();
    let e = translate(&objs, &node_a()).unwrap_err().to_string();
    let file = testdata("bad-nodeport.yaml");
    assert_eq!(
        e,
        format!(
            "{}: Service default/web: spec.ports[0].nodePort: 70000 is out of range 1-65535",
            file.display()
        )
    );
}

#[test]
fn validation_errors() {
    let svc = |name: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: d}}\nspec:\n  type: NodePort\n{extra}"
        )
    };
    let cases = [
        (
            svc("a", "  ports:\n  - port: 80\n"),
            "x.yaml: Service d/a: spec.ports[0].nodePort: missing (a NodePort or LoadBalancer service needs one)",
        ),
        (
            svc(
                "a",
                "  externalIPs: [300.1.1.1]\n  ports:\n  - {port: 80, nodePort: 30080}\n",
            ),
            "x.yaml: Service d/a: spec.externalIPs[0]: \"300.1.1.1\" is not an IP address",
        ),
        (
            format!(
                "{}---\n{}",
                svc("a", "  ports:\n  - {port: 80, nodePort: 30080}\n"),
                svc("b", "  ports:\n  - {port: 81, nodePort: 30080}\n")
            ),
            "x.yaml: Service d/b: spec.ports[0].nodePort: frontend 198.18.0.2:30080/TCP is already used by d/a",
        ),
        (
            format!(
                "{}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: a-1, namespace: d, labels: {{kubernetes.io/service-name: a}}}}\naddressType: IPv4\nports: [{{port: 80}}]\nendpoints:\n- addresses: [10.0.0.999]\n",
                svc("a", "  ports:\n  - {port: 80, nodePort: 30080}\n")
            ),
            "x.yaml: EndpointSlice d/a-1: endpoints[0].addresses[0]: \"10.0.0.999\" is not an IPv4 address",
        ),
    ];
    for (text, want) in cases {
        let e = translate(&parse_str(&text), &node_a()).unwrap_err();
        assert_eq!(e.to_string(), want);
    }
}

#[test]
fn load_balancer_without_node_ports_is_allowed() {
    let objs = parse_str(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: d}\nspec:\n  type: LoadBalancer\n  allocateLoadBalancerNodePorts: false\n  ports:\n  - port: 80\nstatus:\n  loadBalancer:\n    ingress: [{ip: 203.0.113.1}]\n",
    );
    let t = translate(&objs, &node_a()).unwrap();
    let sp = &t.desired.services[&spn("d", "a", "")];
    assert_eq!(sp.frontends.len(), 1);
    assert_eq!(
        sp.frontends.first().unwrap().kind,
        FrontendKind::LoadBalancer
    );
}

#[test]
fn demo_manifest_translates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/demo.yaml");
    let objs = manifests::load(&path).unwrap();
    let t = translate(&objs, &node_a()).unwrap();
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    for (port, proto) in [("http", Proto::Tcp), ("echo-udp", Proto::Udp)] {
        let sp = &t.desired.services[&spn("demo", "echo", port)];
        let f = sp.frontends.first().unwrap();
        assert_eq!(
            (f.addr, f.port, f.proto),
            (Ipv4Addr::new(198, 18, 0, 2), 30090, proto)
        );
        assert_eq!(sp.active_backends().count(), 3);
        assert!(sp.backends.iter().all(|b| b.port == 8080 && b.local));
    }
}

// ---------------------------------------------------------------- planner

fn cfg() -> PlanConfig {
    PlanConfig::new(251).unwrap()
}

/// Applies `plan(maps, desired)` one op at a time, checking after each that
/// nothing the datapath can reach dangles; returns the ops.
fn converge(maps: &mut MemoryMaps, desired: &Desired, cfg: &PlanConfig) -> Vec<Op> {
    let ops = plan(&maps.read_state().unwrap(), desired, cfg).unwrap();
    for op in &ops {
        maps.apply(std::slice::from_ref(op)).unwrap();
        if let Err(e) = maps.check_references() {
            panic!("after {op:?}: {e}");
        }
    }
    ops
}

/// Every desired frontend resolves, for many flow hashes, to an active
/// desired backend (local or remote) of its own service port, and reaches
/// every one of them.
fn assert_resolves(maps: &MemoryMaps, desired: &Desired) {
    for sp in desired.services.values() {
        let active: BTreeSet<([u8; 4], u16)> = sp
            .backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
            .map(|b| (b.addr.octets(), b.port))
            .collect();
        for f in &sp.frontends {
            let key = frontend_key(f.addr, f.port, f.proto);
            assert!(maps.frontends.contains_key(&key));
            let mut seen = BTreeSet::new();
            for i in 0..2000u32 {
                let hash = i.wrapping_mul(0x9e37_79b9);
                match maps.resolve(&key, hash) {
                    Some(b) => {
                        assert_eq!(b.state, BACKEND_ACTIVE);
                        let ap = (b.addr, u16::from_be(b.port_be));
                        assert!(active.contains(&ap), "{ap:?} not in {active:?}");
                        seen.insert(ap);
                    }
                    None => assert!(active.is_empty(), "{f:?} resolved to nothing"),
                }
            }
            if active.len() <= 8 {
                assert_eq!(seen, active);
            }
        }
    }
}

fn demo_desired() -> Desired {
    load_and_translate("list.yaml").desired
}

#[test]
fn plan_apply_replan_is_empty_and_resolves() {
    let d = demo_desired();
    let mut maps = MemoryMaps::new();
    let ops = converge(&mut maps, &d, &cfg());
    // Order: backends, tables, frontends.
    let rank = |op: &Op| match op {
        Op::PutBackend { .. } => 0,
        Op::PutMaglev { .. } | Op::PutBackendList { .. } | Op::PutServiceName { .. } => 1,
        Op::PutSrcRange(_) => 2,
        Op::PutFrontend { .. } => 3,
        Op::DeleteFrontend { .. } => 4,
        Op::DeleteSrcRange(_) => 5,
        Op::DeleteMaglev { .. } | Op::DeleteBackendList { .. } | Op::DeleteServiceName { .. } => 6,
        Op::FreeBackend { .. } => 7,
    };
    assert!(ops.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])));
    // Remote backends are written without BACKEND_F_LOCAL (10.1.x.x are
    // node-a's pods, 10.2.x.x node-b's); local terminating ones are kept.
    let states: Vec<(u8, u8)> = maps.backends.values().map(|b| (b.state, b.flags)).collect();
    assert!(states.iter().any(|&(s, _)| s == BACKEND_TERMINATING));
    for b in maps.backends.values() {
        let local = b.addr[1] == 1;
        assert_eq!(b.flags == BACKEND_F_LOCAL, local, "{b:?}");
    }
    assert!(maps.backends.values().any(|b| b.addr[1] == 2));
    assert!(
        plan(&maps.read_state().unwrap(), &d, &cfg())
            .unwrap()
            .is_empty()
    );
    assert_resolves(&maps, &d);
}

#[test]
fn ids_survive_a_restart() {
    let d = demo_desired();
    let mut maps = MemoryMaps::new();
    converge(&mut maps, &d, &cfg());
    // A new agent knows only what the maps hold.
    let restarted = MemoryMaps::from_state(&maps.read_state().unwrap());
    assert!(
        plan(&restarted.read_state().unwrap(), &d, &cfg())
            .unwrap()
            .is_empty()
    );
    // Adding a service does not renumber the others.
    let mut d2 = d.clone();
    d2.services.insert(
        spn("shop", "new", ""),
        ServicePort {
            frontends: [Frontend {
                addr: Ipv4Addr::new(198, 18, 0, 2),
                port: 30999,
                proto: Proto::Tcp,
                kind: FrontendKind::NodePort,
            }]
            .into(),
            backends: [be([10, 1, 9, 9], 80, BackendState::Active, "node-a")].into(),
            ..Default::default()
        },
    );
    let before = maps.clone();
    let ops = converge(&mut maps, &d2, &cfg());
    // Backend, table, name, frontend.
    assert_eq!(ops.len(), 4, "{} ops", ops.len());
    for (k, v) in &before.frontends {
        assert_eq!(maps.frontends[k], *v);
    }
    for (id, b) in &before.backends {
        assert_eq!(maps.backends[id], *b);
    }
}

#[test]
fn removing_a_backend_frees_only_it() {
    let d = demo_desired();
    let mut maps = MemoryMaps::new();
    converge(&mut maps, &d, &cfg());
    let name = spn("shop", "web", "http");
    let gone = be([10, 1, 0, 1], 8080, BackendState::Active, "node-a");
    let gone_id = *maps
        .backends
        .iter()
        .find(|(_, b)| {
            b.addr == [10, 1, 0, 1] && u16::from_be(b.port_be) == 8080 && {
                let fe = frontend_key(Ipv4Addr::new(203, 0, 113, 10), 80, Proto::Tcp);
                b.service_id == maps.frontends[&fe].service_id
            }
        })
        .unwrap()
        .0;
    let mut d2 = d.clone();
    d2.services.get_mut(&name).unwrap().backends.remove(&gone);
    let ops = converge(&mut maps, &d2, &cfg());
    let frees: Vec<u32> = ops
        .iter()
        .filter_map(|op| match op {
            Op::FreeBackend { id } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(frees, [gone_id]);
    assert!(
        ops.iter()
            .all(|op| !matches!(op, Op::PutBackend { .. } | Op::DeleteFrontend { .. }))
    );
    // One table rewritten, the frontends of that port updated (backend_count).
    assert_eq!(
        ops.iter()
            .filter(|op| matches!(op, Op::PutMaglev { .. }))
            .count(),
        1
    );
    assert_resolves(&maps, &d2);
}

#[test]
fn service_without_active_backends_keeps_frontends_without_table() {
    let d = demo_desired();
    let mut maps = MemoryMaps::new();
    converge(&mut maps, &d, &cfg());
    let mut d2 = d.clone();
    let db = d2.services.get_mut(&spn("shop", "db", "")).unwrap();
    db.backends.clear();
    let ops = converge(&mut maps, &d2, &cfg());
    assert!(ops.iter().any(|op| matches!(op, Op::DeleteMaglev { .. })));
    assert!(ops.iter().any(|op| matches!(op, Op::FreeBackend { .. })));
    let key = frontend_key(Ipv4Addr::new(198, 18, 0, 2), 30432, Proto::Tcp);
    let v = maps.frontends[&key];
    assert_eq!(
        (v.backend_count, v.maglev_size, v.kind),
        (0, 0, FRONTEND_NODEPORT)
    );
    assert_eq!(maps.resolve(&key, 12345), None);
    // Removing everything empties the maps.
    converge(&mut maps, &Desired::default(), &cfg());
    assert_eq!(maps, MemoryMaps::new());
}

#[test]
fn resizing_rewrites_every_table() {
    let d = demo_desired();
    let mut maps = MemoryMaps::new();
    converge(&mut maps, &d, &cfg());
    let ops = converge(&mut maps, &d, &PlanConfig::new(509).unwrap());
    assert_eq!(
        ops.iter()
            .filter(|op| matches!(op, Op::PutMaglev { slots, .. } if slots.len() == 509))
            .count(),
        maps.maglev.len()
    );
    assert!(ops.iter().all(|op| !matches!(op, Op::PutBackend { .. })));
    assert_resolves(&maps, &d);
}

#[test]
fn capacity_and_config_errors_plan_nothing() {
    let d = demo_desired();
    assert!(
        plan(
            &Default::default(),
            &d,
            &PlanConfig {
                maglev_size: Some(250)
            }
        )
        .is_err()
    );
    let mut big = Desired::default();
    for i in 0..lb_common::MAX_SERVICES {
        let sp = ServicePort {
            frontends: [Frontend {
                addr: Ipv4Addr::new(198, 18, 0, 2),
                port: 10_000 + i as u16,
                proto: Proto::Tcp,
                kind: FrontendKind::NodePort,
            }]
            .into(),
            ..Default::default()
        };
        big.services.insert(spn("n", &format!("s{i}"), ""), sp);
    }
    let e = plan(&Default::default(), &big, &cfg())
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "capacity exceeded: service ports: 16384 needed, at most 16383 fit"
    );
}

// ------------------------------------------------------ planner properties

/// A random desired state over small pools of addresses, so that successive
/// states share frontends and backends.
fn arb_desired() -> impl Strategy<Value = Desired> {
    // frontend slot → owning service (0..4) or none.
    let frontends = prop::collection::btree_map(0u8..12, 0usize..4, 0..10);
    let backends = prop::collection::vec(
        prop::collection::btree_map(
            (0u8..10, prop::sample::select(vec![80u16, 8080])),
            (any::<bool>(), prop::bool::weighted(0.8)),
            0..8,
        ),
        4,
    );
    (frontends, backends).prop_map(|(fes, bes)| {
        let mut d = Desired::default();
        for (s, bes) in bes.iter().enumerate() {
            let name = spn("p", &format!("svc{s}"), "");
            let mut sp = ServicePort::default();
            for (&(a, port), &(terminating, local)) in bes {
                sp.backends.insert(Backend {
                    addr: Ipv4Addr::new(10, 0, 0, a),
                    port,
                    state: if terminating {
                        BackendState::Terminating
                    } else {
                        BackendState::Active
                    },
                    node_name: None,
                    local,
                });
            }
            d.services.insert(name, sp);
        }
        for (&slot, &s) in &fes {
            let name = spn("p", &format!("svc{s}"), "");
            d.services
                .get_mut(&name)
                .unwrap()
                .frontends
                .insert(Frontend {
                    addr: Ipv4Addr::new(198, 18, 0, slot % 3),
                    port: 30000 + u16::from(slot / 3),
                    proto: if slot % 2 == 0 {
                        Proto::Tcp
                    } else {
                        Proto::Udp
                    },
                    kind: FrontendKind::NodePort,
                });
        }
        // Service ports without frontends are dropped half of the time.
        d.services
            .retain(|n, sp| !sp.frontends.is_empty() || n.name.ends_with(['0', '2']));
        d
    })
}

/// Backend id of each (service id, addr, port) in `maps`.
fn backend_ids(maps: &MemoryMaps) -> BTreeMap<(u32, [u8; 4], u16), u32> {
    maps.backends
        .iter()
        .map(|(&id, b)| ((b.service_id, b.addr, b.port_be), id))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_transitions_converge(states in prop::collection::vec(arb_desired(), 1..5)) {
        let cfg = cfg();
        let mut maps = MemoryMaps::new();
        let mut prev: Option<Desired> = None;
        for d in &states {
            let before = maps.clone();
            converge(&mut maps, d, &cfg);
            // Idempotent, also for a restarted agent.
            prop_assert!(plan(&maps.read_state().unwrap(), d, &cfg).unwrap().is_empty());
            let restarted = MemoryMaps::from_state(&maps.read_state().unwrap());
            prop_assert!(plan(&restarted.read_state().unwrap(), d, &cfg).unwrap().is_empty());
            assert_resolves(&maps, d);
            // Exactly the backends (local and remote) of reachable service ports are written.
            let want: usize = d.services.values().filter(|s| !s.frontends.is_empty()).map(|s| s.backends.len()).sum();
            prop_assert_eq!(maps.backends.len(), want);
            // A backend that stays in its service keeps its id; a service
            // port that keeps a frontend keeps its id unless another port
            // has more frontends voting for it.
            let old = backend_ids(&before);
            for (k, id) in backend_ids(&maps) {
                if let Some(old_id) = old.get(&k) {
                    prop_assert_eq!(*old_id, id);
                }
            }
            if let Some(p) = &prev {
                for (name, sp) in &d.services {
                    let kept: Vec<_> = p.services.get(name).map(|o| o.frontends.intersection(&sp.frontends).collect()).unwrap_or_default();
                    let sids = |m: &MemoryMaps, fs: &[&Frontend]| -> BTreeSet<u32> {
                        fs.iter().map(|f| m.frontends[&frontend_key(f.addr, f.port, f.proto)].service_id).collect()
                    };
                    // Every frontend kept, and only those: the id stays.
                    let all_kept = kept.len() == sp.frontends.len() && Some(kept.len()) == p.services.get(name).map(|o| o.frontends.len());
                    if all_kept && !kept.is_empty() {
                        prop_assert_eq!(sids(&before, &kept), sids(&maps, &kept));
                    }
                }
            }
            prev = Some(d.clone());
        }
        // And back to nothing.
        converge(&mut maps, &Desired::default(), &cfg);
        prop_assert_eq!(maps, MemoryMaps::new());
    }
}

/// Frontends of `d` whose service port has an active backend, by key.
fn served(d: &Desired) -> BTreeMap<FrontendKeyV4, ServicePortName> {
    d.services
        .iter()
        .filter(|(_, sp)| sp.backends.iter().any(|b| b.state == BackendState::Active))
        .flat_map(|(n, sp)| {
            sp.frontends
                .iter()
                .map(move |f| (frontend_key(f.addr, f.port, f.proto), n.clone()))
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// A transition (a backend turning terminating, being replaced, added or
    /// removed) never has a moment, between two map writes, in which a new
    /// flow to a frontend that has a usable backend before and after finds
    /// none and would be rejected.
    #[test]
    fn no_new_flow_is_refused_while_a_usable_backend_exists(
        states in prop::collection::vec(arb_desired(), 2..5)
    ) {
        let cfg = cfg();
        let mut maps = MemoryMaps::new();
        converge(&mut maps, &states[0], &cfg);
        for pair in states.windows(2) {
            let (before, after) = (served(&pair[0]), served(&pair[1]));
            let both: Vec<FrontendKeyV4> = before
                .iter()
                .filter(|(k, n)| after.get(k) == Some(n))
                .map(|(k, _)| *k)
                .collect();
            let ops = plan(&maps.read_state().unwrap(), &pair[1], &cfg).unwrap();
            for (i, op) in ops.iter().enumerate() {
                maps.apply(std::slice::from_ref(op)).unwrap();
                for key in &both {
                    for h in 0..300u32 {
                        let hash = h.wrapping_mul(0x9e37_79b9);
                        prop_assert!(
                            maps.resolve(key, hash).is_some(),
                            "after op {i} ({op:?}) of {}: {key:?} refuses hash {hash:#x}",
                            ops.len()
                        );
                    }
                }
            }
        }
    }
}
