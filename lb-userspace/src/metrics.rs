//! Prometheus metrics. Agent-side figures (services, backends, syncs) are
//! kept in a registry; datapath counters are read from the pinned per-CPU
//! maps at scrape time by [`DatapathCollector`], labelled with the service
//! and backend names the agent last wrote.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, RwLock},
};

use aya::maps::{MapData, PerCpuArray};
use lb_common::{BackendCounters, Counters, Stats, pin};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::{model::Desired, plan::frontend_key, writer::MapState};

/// Label set `{result="ok"|"error"}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Label set `{state="active"|"terminating"}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// Backend state.
    pub state: &'static str,
}

/// Label set `{interface, hook="xdp"|"tc"}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttachLabel {
    /// The interface.
    pub interface: String,
    /// [`crate::loader::IngressHook::name`].
    pub hook: &'static str,
}

/// Label set `{reason="invalid"|"frontend_conflict"|…}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// [`crate::translate::SkipReason::name`].
    pub reason: &'static str,
}

/// Names of what the maps hold, for labels: service id → `ns/name:port`,
/// backend id → (service, `ip:port`).
#[derive(Clone, Debug, Default)]
pub struct Names {
    /// Service id → service port name.
    pub services: BTreeMap<u32, String>,
    /// Backend id → (service port name, `ip:port`).
    pub backends: BTreeMap<u32, (String, String)>,
}

impl Names {
    /// Names for the ids in `state`, found through the desired state's frontends.
    pub fn of(desired: &Desired, state: &MapState) -> Self {
        let mut n = Names::default();
        let mut by_service: BTreeMap<u32, Vec<(u32, &lb_common::BackendV4)>> = BTreeMap::new();
        for (&id, b) in &state.backends {
            by_service.entry(b.service_id).or_default().push((id, b));
        }
        for (name, sp) in &desired.services {
            let Some(sid) = sp
                .frontends
                .iter()
                .find_map(|f| state.frontends.get(&frontend_key(f.addr, f.port, f.proto)))
                .map(|v| v.service_id)
            else {
                continue;
            };
            n.services.insert(sid, name.to_string());
            for &(id, b) in by_service.get(&sid).into_iter().flatten() {
                let addr = std::net::Ipv4Addr::from(b.addr);
                n.backends.insert(
                    id,
                    (
                        name.to_string(),
                        format!("{addr}:{}", u16::from_be(b.port_be)),
                    ),
                );
            }
        }
        n
    }
}

impl Names {
    /// Follows `ops`, just applied to the maps that `state` pictures: the
    /// names of the service ids and backends they wrote or removed.
    pub fn apply(&mut self, ops: &[crate::writer::Op], state: &MapState) {
        use crate::writer::Op;
        // Names first: a plan writes backends before their service's name.
        for op in ops {
            match op {
                Op::PutServiceName { service_id, name } => {
                    self.services.insert(*service_id, name.clone());
                }
                Op::DeleteServiceName { service_id } => {
                    self.services.remove(service_id);
                }
                _ => {}
            }
        }
        for op in ops {
            let id = match op {
                Op::PutBackend { id, .. } | Op::FreeBackend { id } => *id,
                _ => continue,
            };
            let named = state.backends.get(&id).and_then(|b| {
                let service = self.services.get(&b.service_id)?.clone();
                let addr = std::net::Ipv4Addr::from(b.addr);
                Some((service, format!("{addr}:{}", u16::from_be(b.port_be))))
            });
            match named {
                Some(n) => self.backends.insert(id, n),
                None => self.backends.remove(&id),
            };
        }
    }
}

/// Everything `/metrics` serves.
pub struct Metrics {
    /// The registry encoded on each scrape.
    pub registry: Registry,
    /// `lb_services`: service ports in the maps.
    pub services: Gauge,
    /// `lb_frontends`.
    pub frontends: Gauge,
    /// `lb_backends{state}`.
    pub backends: Family<StateLabel, Gauge>,
    /// `lb_sync_duration_seconds`: objects → maps, per sync.
    pub sync_seconds: Histogram,
    /// `lb_syncs_total{result}`.
    pub syncs: Family<ResultLabel, Counter>,
    /// `lb_skipped_service_ports{reason}`: service ports the last sync left
    /// out in whole or in part, by reason (`/skipped` lists them).
    pub skipped: Family<ReasonLabel, Gauge>,
    /// Names for the datapath collector's labels.
    pub names: Arc<RwLock<Names>>,
    /// `lb_conntrack_entries`: conntrack fill level at the last collection.
    pub ct_entries: Gauge,
    /// `lb_nat_entries`: NAT table fill level at the last collection.
    pub nat_entries: Gauge,
    /// `lb_gc_flows_removed_total`.
    pub gc_removed: Counter,
    /// `lb_attached{interface, hook}`: 1 for the hook running the ingress
    /// logic on each interface.
    pub attached: Family<AttachLabel, Gauge>,
}

impl Metrics {
    /// A registry with the agent's metrics and a collector reading the maps
    /// pinned in `pin_dir`.
    pub fn new(pin_dir: PathBuf) -> Self {
        let mut registry = Registry::with_prefix("lb");
        let services = Gauge::default();
        let frontends = Gauge::default();
        let backends = Family::<StateLabel, Gauge>::default();
        let sync_seconds = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]);
        let syncs = Family::<ResultLabel, Counter>::default();
        registry.register(
            "services",
            "Service ports in the datapath maps",
            services.clone(),
        );
        registry.register(
            "frontends",
            "Frontends (address, port, protocol)",
            frontends.clone(),
        );
        registry.register("backends", "Backends by state", backends.clone());
        registry.register(
            "sync_duration_seconds",
            "Time from a source change to the maps updated (translate, plan, write)",
            sync_seconds.clone(),
        );
        registry.register("syncs", "Syncs of the maps, by result", syncs.clone());
        let skipped = Family::<ReasonLabel, Gauge>::default();
        registry.register(
            "skipped_service_ports",
            "Service ports left out of the last sync, in whole or in part (a refused \
             externalIP, an invalid endpoint), by reason; /skipped lists them",
            skipped.clone(),
        );
        let ct_entries = Gauge::default();
        let nat_entries = Gauge::default();
        let gc_removed = Counter::default();
        registry.register(
            "conntrack_entries",
            "Conntrack entries seen by the last collection's walk (two per local flow, one per \
             forwarded flow); while the table is rewritten during the walk, the entries that \
             existed at some moment of it",
            ct_entries.clone(),
        );
        registry.register(
            "nat_entries",
            "SNAT mappings of flows forwarded to other nodes",
            nat_entries.clone(),
        );
        registry.register(
            "gc_flows_removed",
            "Flows removed by the garbage collector (ended or idle)",
            gc_removed.clone(),
        );
        let attached = Family::<AttachLabel, Gauge>::default();
        registry.register(
            "attached",
            "1 for the hook that runs the ingress logic on each interface (xdp: native XDP; \
             tc: TC ingress)",
            attached.clone(),
        );
        let names = Arc::new(RwLock::new(Names::default()));
        registry.register_collector(Box::new(DatapathCollector {
            pin_dir,
            names: names.clone(),
        }));
        Self {
            registry,
            services,
            frontends,
            backends,
            sync_seconds,
            syncs,
            skipped,
            names,
            ct_entries,
            nat_entries,
            gc_removed,
            attached,
        }
    }

    /// Records that `hook` runs the ingress logic on `iface`.
    pub fn set_attached(&self, iface: &str, hook: crate::loader::IngressHook) {
        self.attached
            .get_or_create(&AttachLabel {
                interface: iface.to_owned(),
                hook: hook.name(),
            })
            .set(1);
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("encoding metrics: {e}");
        }
        out
    }
}

/// Reads the datapath's per-CPU counters at scrape time.
#[derive(Debug)]
pub struct DatapathCollector {
    pin_dir: PathBuf,
    names: Arc<RwLock<Names>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    service: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CounterLabel {
    counter: &'static str,
}

fn per_cpu<T: aya::Pod + Default>(
    dir: &std::path::Path,
    name: &str,
) -> Option<PerCpuArray<MapData, T>> {
    crate::pinned::per_cpu_array(dir, name).ok()
}

fn sum_counters(map: &PerCpuArray<MapData, Counters>, id: u32) -> Counters {
    let mut c = Counters::default();
    if let Ok(v) = map.get(&id, 0) {
        for cpu in v.iter() {
            c.add(cpu);
        }
    }
    c
}

type CounterOf = fn(&Counters) -> u64;
type BackendCounterOf = fn(&BackendCounters) -> u64;

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let names = self.names.read().map(|n| n.clone()).unwrap_or_default();
        let fields: [(&str, &str, BackendCounterOf); 3] = [
            ("packets", "Packets balanced", |c| c.packets),
            ("bytes", "Bytes balanced (Ethernet frames)", |c| c.bytes),
            ("new_flows", "New flows pinned", |c| c.new_flows),
        ];
        if let Ok(be) =
            crate::pinned::array::<BackendCounters>(&self.pin_dir, pin::BACKEND_COUNTERS)
        {
            let values: Vec<(BackendLabels, BackendCounters)> = names
                .backends
                .iter()
                .map(|(&id, (service, backend))| {
                    let labels = BackendLabels {
                        service: service.clone(),
                        backend: backend.clone(),
                    };
                    (labels, be.get(&id, 0).unwrap_or_default())
                })
                .collect();
            for (name, help, get) in fields {
                let name = format!("backend_{name}");
                let mut m = encoder.encode_descriptor(
                    &name,
                    &format!("{help}, per backend"),
                    None,
                    MetricType::Counter,
                )?;
                for (labels, c) in &values {
                    ConstCounter::new(get(c)).encode(m.encode_family(labels)?)?;
                }
            }
        }
        // Open flows per backend, exact (the datapath's counts).
        if let Ok(open) = crate::pinned::array::<u64>(&self.pin_dir, pin::BACKEND_OPEN_FLOWS) {
            let mut m = encoder.encode_descriptor(
                "backend_open_flows",
                "Flows open on this node, per backend (from pinning to RST, FIN both ways or timeout)",
                None,
                MetricType::Gauge,
            )?;
            for (&id, (service, backend)) in &names.backends {
                let labels = BackendLabels {
                    service: service.clone(),
                    backend: backend.clone(),
                };
                let n = open.get(&id, 0).unwrap_or(0);
                ConstGauge::new(n as i64).encode(m.encode_family(&labels)?)?;
            }
        }
        if let Some(svc) = per_cpu::<Counters>(&self.pin_dir, pin::SERVICE_COUNTERS) {
            let values: Vec<(ServiceLabels, Counters)> = names
                .services
                .iter()
                .map(|(&id, s)| (ServiceLabels { service: s.clone() }, sum_counters(&svc, id)))
                .collect();
            let fields: [(&str, &str, CounterOf); 5] = [
                ("packets", "Packets balanced", |c| c.packets),
                ("bytes", "Bytes balanced", |c| c.bytes),
                ("new_flows", "New flows pinned", |c| c.new_flows),
                ("no_backend", "Packets that found no usable backend", |c| {
                    c.no_backend
                }),
                (
                    "denied",
                    "Packets dropped by loadBalancerSourceRanges",
                    |c| c.denied,
                ),
            ];
            for (name, help, get) in fields {
                let name = format!("service_{name}");
                let mut m = encoder.encode_descriptor(
                    &name,
                    &format!("{help}, per service port"),
                    None,
                    MetricType::Counter,
                )?;
                for (labels, c) in &values {
                    ConstCounter::new(get(c)).encode(m.encode_family(labels)?)?;
                }
            }
        }
        if let Some(stats) = per_cpu::<Stats>(&self.pin_dir, pin::STATS) {
            let mut total = Stats::default();
            if let Ok(v) = stats.get(&0, 0) {
                for cpu in v.iter() {
                    total.add(cpu);
                }
            }
            let mut m = encoder.encode_descriptor(
                "datapath",
                "Datapath verdict counters (LB_STATS fields; see README, Verdicts)",
                None,
                MetricType::Counter,
            )?;
            for (counter, v) in total.named() {
                ConstCounter::new(v).encode(m.encode_family(&CounterLabel { counter })?)?;
            }
        }
        Ok(())
    }
}
