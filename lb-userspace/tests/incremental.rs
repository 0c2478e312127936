//! The incremental pipeline against the pipeline from scratch: after any
//! random sequence of changes to Services and EndpointSlices (with frontend
//! conflicts, refused externalIPs, capacity limits, relabelled slices and
//! deletions), a pipeline that translates and plans only the Services that
//! changed holds exactly what a fresh pipeline builds from all the objects.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use proptest::prelude::*;

use lb_common::FrontendKeyV4;
use lb_userspace::agent::Pipeline;
use lb_userspace::health::{HttpLimits, HttpRuntime, Shared};
use lb_userspace::incremental::{Changed, DesiredState, Scope};
use lb_userspace::metrics::Metrics;
use lb_userspace::plan::{PlanConfig, plan};
use lb_userspace::source::Objects;
use lb_userspace::translate::{Capacity, TranslateOptions, translate_with};
use lb_userspace::writer::{MapState, MapWriter, memory::MemoryMaps};

use support::{node_a, parse_str};

const SERVICES: usize = 6;
const SLICES: usize = 5;

/// One Service as the generator writes it.
#[derive(Clone, Debug)]
struct Svc {
    /// 0: NodePort, 1: LoadBalancer, 2: ClusterIP with externalIPs.
    kind: u8,
    /// nodePort of the first port, from a small set (so that they collide).
    node_port: u16,
    /// Last octet of the LB IP (also a small set).
    lb_ip: u8,
    /// externalIP: 3 is the node's own address (refused).
    ext_ip: u8,
    created: u8,
    two_ports: bool,
    udp: bool,
    local: bool,
    policy: u8,
}

/// One EndpointSlice: its Service and its endpoints (address octet,
/// condition 0 ready / 1 serving-terminating / 2 not serving, on node-a).
#[derive(Clone, Debug)]
struct Slice {
    owner: usize,
    endpoints: Vec<(u8, u8, bool)>,
}

#[derive(Clone, Debug)]
enum Event {
    PutService(usize, Svc),
    DeleteService(usize),
    PutSlice(usize, Slice),
    DeleteSlice(usize),
}

fn arb_svc() -> impl Strategy<Value = Svc> {
    (
        0u8..3,
        30_000u16..30_003,
        0u8..3,
        0u8..4,
        0u8..3,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0u8..3,
    )
        .prop_map(
            |(kind, node_port, lb_ip, ext_ip, created, two_ports, udp, local, policy)| Svc {
                kind,
                node_port,
                lb_ip,
                ext_ip,
                created,
                two_ports,
                udp,
                local,
                policy,
            },
        )
}

fn arb_slice() -> impl Strategy<Value = Slice> {
    (
        0..SERVICES,
        prop::collection::vec((1u8..8, 0u8..3, any::<bool>()), 0..5),
    )
        .prop_map(|(owner, endpoints)| Slice { owner, endpoints })
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => (0..SERVICES, arb_svc()).prop_map(|(i, s)| Event::PutService(i, s)),
        1 => (0..SERVICES).prop_map(Event::DeleteService),
        3 => (0..SLICES, arb_slice()).prop_map(|(i, s)| Event::PutSlice(i, s)),
        1 => (0..SLICES).prop_map(Event::DeleteSlice),
    ]
}

/// The objects of a world of Services and slices, as manifests.
fn objects(services: &BTreeMap<usize, Svc>, slices: &BTreeMap<usize, Slice>) -> Objects {
    let mut y = String::new();
    for (i, s) in services {
        let ty = ["NodePort", "LoadBalancer", "ClusterIP"][s.kind as usize];
        let policy = ["maglev", "round-robin", "least-connection"][s.policy as usize];
        let ext = if s.ext_ip == 3 {
            "198.18.0.2".to_owned()
        } else {
            format!("203.0.113.{}", s.ext_ip + 1)
        };
        let np = |n: u16| {
            if s.kind == 2 {
                String::new()
            } else {
                format!(", nodePort: {n}")
            }
        };
        let proto = if s.udp { "UDP" } else { "TCP" };
        write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: a, \
             creationTimestamp: \"2024-01-0{}T00:00:00Z\", annotations: {{lb-agent.dev/balancing: {policy}}}}}\n\
             spec:\n  type: {ty}\n  externalTrafficPolicy: {}\n  externalIPs: [{ext}]\n  ports:\n  \
             - {{name: p0, port: 80, protocol: {proto}{}}}\n",
            s.created + 1,
            if s.local && s.kind == 1 { "Local" } else { "Cluster" },
            np(s.node_port),
        )
        .unwrap();
        if s.two_ports {
            writeln!(
                y,
                "  - {{name: p1, port: 81, protocol: UDP{}}}",
                np(30_010 + *i as u16)
            )
            .unwrap();
        }
        if s.kind == 1 {
            writeln!(
                y,
                "status:\n  loadBalancer:\n    ingress: [{{ip: 192.0.2.{}}}]",
                s.lb_ip + 1
            )
            .unwrap();
        }
    }
    for (i, sl) in slices {
        write!(
            y,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: e{i}, namespace: a, \
             labels: {{kubernetes.io/service-name: s{}}}}}\naddressType: IPv4\n\
             ports: [{{name: p0, port: 8080, protocol: TCP}}, {{name: p0, port: 8080, protocol: UDP}}, \
             {{name: p1, port: 8081, protocol: UDP}}]\nendpoints:{}\n",
            sl.owner,
            if sl.endpoints.is_empty() { " []" } else { "" }
        )
        .unwrap();
        for (addr, cond, local) in &sl.endpoints {
            let (ready, serving, terminating) = match cond {
                0 => (true, true, false),
                1 => (false, true, true),
                _ => (false, false, true),
            };
            writeln!(
                y,
                "- {{addresses: [10.0.{i}.{addr}], nodeName: {}, conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}}}",
                if *local { "node-a" } else { "node-b" }
            )
            .unwrap();
        }
    }
    if y.is_empty() {
        return Objects::default();
    }
    parse_str(&y)
}

fn opts() -> TranslateOptions {
    TranslateOptions {
        // Small enough that the random worlds run into it.
        capacity: Capacity {
            service_ports: 6,
            frontends: 9,
            backends: 14,
        },
        ..Default::default()
    }
}

fn cfg() -> PlanConfig {
    PlanConfig::new(251).unwrap()
}

fn pipeline() -> (Pipeline<MemoryMaps>, std::sync::Arc<Shared>, HttpRuntime) {
    let http = HttpRuntime::start(HttpLimits::default()).unwrap();
    let shared = std::sync::Arc::new(Shared::new(Metrics::new("/nonexistent".into())));
    let p = Pipeline::new(
        node_a(),
        opts(),
        cfg(),
        MemoryMaps::new(),
        shared.clone(),
        http.health_checks(),
    )
    .unwrap();
    (p, shared, http)
}

/// What a frontend leads to, without ids: its service's name and value
/// (id zeroed), its backends, its table's slots and its list as
/// (address, port), its source ranges.
type Picture = BTreeMap<FrontendKeyV4, String>;

fn picture(maps: &MemoryMaps) -> Picture {
    let ap = |id: &u32| {
        maps.backends
            .get(id)
            .map(|b| (b.addr, u16::from_be(b.port_be)))
    };
    maps.frontends
        .iter()
        .map(|(k, v)| {
            let sid = v.service_id;
            let backends: BTreeSet<_> = maps
                .backends
                .values()
                .filter(|b| b.service_id == sid)
                .map(|b| (b.addr, u16::from_be(b.port_be), b.state, b.flags))
                .collect();
            let table: Vec<_> = maps.table(sid).unwrap_or_default().iter().map(ap).collect();
            let list: Vec<_> = maps
                .backend_lists
                .get(&sid)
                .into_iter()
                .flatten()
                .map(ap)
                .collect();
            let ranges: Vec<_> = maps
                .src_ranges_of(sid)
                .map(|r| (r.addr, r.prefix_len))
                .collect();
            let value = lb_common::ServiceValue {
                service_id: 0,
                ..*v
            };
            let text = format!(
                "{:?} {value:?} {backends:?} {table:?} {list:?} {ranges:?}",
                maps.names.get(&sid)
            );
            (*k, text)
        })
        .collect()
}

fn sorted_skipped(shared: &Shared) -> Vec<String> {
    let mut v: Vec<String> = shared
        .skipped
        .read()
        .unwrap()
        .iter()
        .map(|s| format!("{s:?}"))
        .collect();
    v.sort();
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn incremental_syncs_hold_what_a_sync_from_scratch_builds(
        events in prop::collection::vec(arb_event(), 1..16)
    ) {
        let (mut inc, inc_shared, _http) = pipeline();
        let mut services = BTreeMap::new();
        let mut slices = BTreeMap::new();
        let mut before = Objects::default();
        inc.sync(&before).unwrap();
        for ev in events {
            match ev {
                Event::PutService(i, s) => { services.insert(i, s); }
                Event::DeleteService(i) => { services.remove(&i); }
                Event::PutSlice(i, s) => { slices.insert(i, s); }
                Event::DeleteSlice(i) => { slices.remove(&i); }
            }
            let now = objects(&services, &slices);
            // As the agent does on SIGHUP: only the Services whose objects differ.
            let keys = before.changed_services(&now);
            inc.update(&Scope::Services(keys.clone()), &now.only(&keys)).unwrap();

            // Translation: the same desired state and reports as from scratch.
            let full = translate_with(&now, &node_a(), &opts());
            prop_assert_eq!(inc.desired(), &full.desired);
            let mut want_skipped: Vec<String> =
                full.skipped.iter().map(|s| format!("{s:?}")).collect();
            want_skipped.sort();
            prop_assert_eq!(sorted_skipped(&inc_shared), want_skipped);

            // Planning: a full plan against the maps finds nothing to do,
            // the maps hold what a fresh pipeline writes, nothing dangles,
            // and the index by service id is what the maps say.
            let state = inc.maps().read_state().unwrap();
            prop_assert_eq!(plan(&state, &full.desired, &cfg()).unwrap(), vec![]);
            let (mut fresh, _, _http2) = pipeline();
            fresh.sync(&now).unwrap();
            prop_assert_eq!(picture(inc.maps()), picture(fresh.maps()));
            prop_assert!(inc.maps().check_references().is_ok());
            let rebuilt = MapState::new(
                state.frontends.clone(),
                state.maglev.clone(),
                state.backends.clone(),
                state.src_ranges.clone(),
                state.backend_lists.clone(),
                state.names.clone(),
                state.stale_tables.clone(),
            );
            prop_assert_eq!(&rebuilt, &state);
            before = now;
        }
    }
}

#[test]
fn an_unchanged_reload_plans_nothing_and_a_changed_endpoint_only_its_service() {
    let (mut p, _shared, _http) = pipeline();
    let svc = |i: usize| Svc {
        kind: 0,
        node_port: 30_000 + i as u16,
        lb_ip: 0,
        ext_ip: i as u8,
        created: 0,
        two_ports: false,
        udp: false,
        local: false,
        policy: 0,
    };
    let services: BTreeMap<usize, Svc> = (0..3).map(|i| (i, svc(i))).collect();
    let mut slices: BTreeMap<usize, Slice> = (0..3)
        .map(|i| {
            (
                i,
                Slice {
                    owner: i,
                    endpoints: vec![(1, 0, true), (2, 0, false)],
                },
            )
        })
        .collect();
    let before = objects(&services, &slices);
    p.sync(&before).unwrap();
    let same = objects(&services, &slices);
    let keys = before.changed_services(&same);
    assert!(keys.is_empty());
    assert_eq!(
        p.update(&Scope::Services(keys), &same.only(&BTreeSet::new()))
            .unwrap(),
        0
    );

    slices.get_mut(&1).unwrap().endpoints.push((3, 0, true));
    let after = objects(&services, &slices);
    let keys = before.changed_services(&after);
    assert_eq!(
        keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        ["a/s1"]
    );
    let (mut fresh, _, _http2) = pipeline();
    fresh.sync(&after).unwrap();

    // Translated alone: only s1's port changed, with what it was.
    let mut state = DesiredState::new(node_a(), opts());
    assert_eq!(state.update(&Scope::All, &before), Changed::All);
    match state.update(&Scope::Services(keys.clone()), &after.only(&keys)) {
        Changed::Ports(p) => {
            let names: Vec<String> = p.keys().map(|n| n.to_string()).collect();
            assert_eq!(names, ["a/s1:p0"]);
            assert_eq!(
                p.values().next().unwrap().as_ref().unwrap().backends.len(),
                2
            );
        }
        Changed::All => panic!("a new endpoint of one service re-admitted everything"),
    }
    // Planned alone: the new backend, its service's table, its frontends'
    // backend count (two frontends).
    let ops = p
        .update(&Scope::Services(keys.clone()), &after.only(&keys))
        .unwrap();
    assert_eq!(ops, 4);
    assert_eq!(picture(p.maps()), picture(fresh.maps()));
}
