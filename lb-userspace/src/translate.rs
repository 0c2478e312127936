//! Kubernetes objects → desired state, with kube-proxy's semantics.
//!
//! * Services of `spec.type` NodePort and LoadBalancer are balanced, and
//!   so are the `spec.externalIPs` of ClusterIP ones (as kube-proxy does:
//!   ExternalIp frontends only, no nodePort). ExternalName ones, ClusterIP
//!   ones without externalIPs, headless ones (`clusterIP: None`) and ones
//!   labelled `service.kubernetes.io/service-proxy-name` (they belong to
//!   another proxy) are skipped silently.
//! * One [`ServicePort`] per entry of `spec.ports`, TCP (default) or UDP;
//!   SCTP ports are skipped with a warning.
//! * Frontends: the nodePort on every node address, each IPv4
//!   `status.loadBalancer.ingress[].ip` (not those with `ipMode: Proxy`,
//!   which the cloud load balancer terminates itself) and each
//!   `spec.externalIPs[]` on `port`. IPv6 addresses are ignored for now.
//! * Backends: the first address of each endpoint of every IPv4
//!   EndpointSlice labelled `kubernetes.io/service-name: <service>` in the
//!   same namespace, on the slice port of the same name and protocol as the
//!   service port (targetPort by number or by name ends up there), merged
//!   over slices by (address, port).
//! * Conditions: ready (nil means true) → Active; not ready but serving and
//!   terminating → Terminating, or Active when the service port has no ready
//!   endpoint at all (KEP-1669); otherwise left out.
//! * Endpoints on other nodes are kept with `local: false`.
//!
//! One bad object never stops the others. [`translate_with`] leaves out
//! what it cannot balance and reports each part in [`Translation::skipped`]
//! with a [`SkipReason`], naming the object and the field:
//!
//! * `invalid`: an invalid Service-wide field leaves the whole Service out
//!   (ignoring only that field could open it wider than asked); an invalid
//!   port field, that port; an invalid EndpointSlice port or address, those
//!   endpoints.
//! * `external_ip_is_node_address`: an externalIPs entry that is an address
//!   of this node is refused (it would capture the node's own traffic,
//!   CVE-2020-8554) unless [`TranslateOptions::allow_external_ip_node_address`];
//!   the rest of the Service is balanced.
//! * `frontend_conflict`: a service port with a frontend (address, port,
//!   protocol) that an earlier service port already holds is left out,
//!   whole. Services are taken oldest first ([`older_first`]:
//!   `creationTimestamp`, then namespace, then name; ports in `spec.ports`
//!   order), so the winner is the same on every node and at every sync, and
//!   a newer Service can never take a frontend from an older one.
//! * `capacity`: in the same order, a service port that would not fit in
//!   the maps ([`Capacity`]) is left out: the newest go first.
//!
//! The desired state therefore always plans: no frontend is claimed twice
//! and it fits in the maps ([`crate::plan::plan`] still checks both).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use lb_common::{MAX_BACKENDS, MAX_FRONTENDS, MAX_SERVICES};

use crate::error::{Error, Result};
use crate::model::{
    Backend, BackendState, BalancingPolicy, Desired, Frontend, FrontendKind, Ipv4Cidr, Proto,
    ServicePort, ServicePortName, SessionAffinity, TrafficPolicy,
};
use crate::source::{ObjectRef, Objects};

/// Label that ties an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label that hands a Service to another proxy implementation.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Annotation on a Service choosing its balancing policy: `maglev`
/// (default), `round-robin` or `least-connection`. Any other value: a
/// warning, and Maglev.
pub const ANNOTATION_BALANCING: &str = "lb-agent.dev/balancing";
/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// What translation needs to know about the node it runs for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name (compared with `endpoints[].nodeName`).
    pub node_name: String,
    /// The addresses NodePorts are opened on.
    pub node_addrs: Vec<Ipv4Addr>,
}

/// The result of a translation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    /// What the datapath should balance.
    pub desired: Desired,
    /// Things skipped or left out that a user may want to know about.
    pub warnings: Vec<String>,
    /// Objects, or parts of objects, left out of `desired` because they are
    /// invalid or collide with older ones; each names what to fix.
    pub skipped: Vec<Skipped>,
}

/// Settings of [`translate_with`] that do not describe the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslateOptions {
    /// Accept `spec.externalIPs` entries that are addresses of this node
    /// (refused by default: they let any Service capture the node's own
    /// traffic, CVE-2020-8554).
    pub allow_external_ip_node_address: bool,
    /// Addresses of this node besides [`NodeContext::node_addrs`] (those of
    /// interfaces the datapath is not attached to), refused as externalIPs
    /// like them.
    pub other_node_addrs: BTreeSet<Ipv4Addr>,
    /// What the maps hold; service ports beyond it are skipped.
    pub capacity: Capacity,
}

impl Default for TranslateOptions {
    /// Node addresses refused as externalIPs, the maps' capacity.
    fn default() -> Self {
        Self {
            allow_external_ip_node_address: false,
            other_node_addrs: BTreeSet::new(),
            capacity: Capacity::MAPS,
        }
    }
}

/// How many service ports, frontends and backends the desired state may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Service ports with at least one frontend.
    pub service_ports: usize,
    /// Frontends, over all service ports.
    pub frontends: usize,
    /// Backends, over all service ports with a frontend.
    pub backends: usize,
}

impl Capacity {
    /// Nothing.
    pub const ZERO: Capacity = Capacity {
        service_ports: 0,
        frontends: 0,
        backends: 0,
    };

    /// Whether `self` fits in `cap`.
    pub fn within(&self, cap: &Capacity) -> bool {
        self.service_ports <= cap.service_ports
            && self.frontends <= cap.frontends
            && self.backends <= cap.backends
    }

    /// `self` + `other` (`sign` 1) or `self` − `other` (`sign` −1).
    pub fn add(&mut self, other: &Capacity, sign: isize) {
        let f = |a: &mut usize, b: usize| *a = a.saturating_add_signed(sign * b as isize);
        f(&mut self.service_ports, other.service_ports);
        f(&mut self.frontends, other.frontends);
        f(&mut self.backends, other.backends);
    }

    /// What the datapath maps hold (ids 0 of services and backends are
    /// reserved); [`crate::plan::plan`] refuses anything larger.
    pub const MAPS: Capacity = Capacity {
        service_ports: MAX_SERVICES as usize - 1,
        frontends: MAX_FRONTENDS as usize,
        backends: MAX_BACKENDS as usize - 1,
    };
}

/// Why something was left out of the desired state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// A field has a value translation cannot use.
    Invalid,
    /// A frontend (address, port, protocol) is already claimed by an older
    /// Service (or an earlier port of the same Service).
    FrontendConflict,
    /// A `spec.externalIPs` entry is an address of this node.
    ExternalIpIsNodeAddress,
    /// The desired state would not fit in the maps.
    Capacity,
}

impl SkipReason {
    /// Every reason, in order.
    pub const ALL: [SkipReason; 4] = [
        SkipReason::Invalid,
        SkipReason::FrontendConflict,
        SkipReason::ExternalIpIsNodeAddress,
        SkipReason::Capacity,
    ];

    /// The metric label and JSON value: `invalid`, `frontend_conflict`,
    /// `external_ip_is_node_address`, `capacity`.
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::Invalid => "invalid",
            SkipReason::FrontendConflict => "frontend_conflict",
            SkipReason::ExternalIpIsNodeAddress => "external_ip_is_node_address",
            SkipReason::Capacity => "capacity",
        }
    }
}

/// How much of its service ports a [`Skipped`] entry left out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkippedPart {
    /// The service ports themselves: nothing of them is balanced.
    ServicePorts,
    /// One frontend of each (a refused externalIPs entry); the rest syncs.
    Frontend,
    /// Endpoints of an EndpointSlice; the service ports sync without them.
    Endpoints,
}

/// One object, or part of one, left out of the desired state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Skipped {
    /// Why.
    pub reason: SkipReason,
    /// What of the service ports was left out.
    pub part: SkippedPart,
    /// The object to fix: `Service namespace/name` or `EndpointSlice …`.
    pub object: String,
    /// The manifest the object was read from, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<std::path::PathBuf>,
    /// Path of the offending field, e.g. `spec.externalIPs[0]`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
    /// The service ports that lost something, as `ns/name:port`.
    pub service_ports: Vec<String>,
}

impl Skipped {
    /// The same report as an [`Error::Invalid`].
    pub fn to_error(&self) -> Error {
        Error::invalid(&self.object, &self.field, &self.message).in_file(self.file.as_deref())
    }
}

impl std::fmt::Display for Skipped {
    /// As [`Error::Invalid`]: `file: Kind ns/name: field: message`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.to_error().fmt(f)
    }
}

/// Turns Services and EndpointSlices into the desired state of `node`, and
/// insists that every object translates: fails with the first entry
/// [`translate_with`] would skip (bad address, port out of range, missing
/// nodePort, frontend claimed by two service ports, an externalIP that is a
/// node address, …), naming the object and the field (and the file, when
/// the objects came from files). For tools and tests that validate
/// manifests; the agent uses [`translate_with`].
pub fn translate(objs: &Objects, node: &NodeContext) -> Result<Translation> {
    let t = translate_with(objs, node, &TranslateOptions::default());
    match t.skipped.first() {
        Some(s) => Err(s.to_error()),
        None => Ok(t),
    }
}

/// Turns Services and EndpointSlices into the desired state of `node`,
/// leaving out what cannot be balanced and reporting each part left out in
/// [`Translation::skipped`]; everything else is translated.
///
/// Each Service is translated on its own ([`translate_service`]), then the
/// Services are admitted oldest first (see [`older_first`] and [`Arbiter`]):
/// when two claim one frontend, or the maps cannot hold them all, the newer
/// one loses. [`crate::incremental::DesiredState`] keeps the same result
/// current from the Services that changed.
pub fn translate_with(objs: &Objects, node: &NodeContext, opts: &TranslateOptions) -> Translation {
    let slices = slices_by_service(&objs.slices);
    let mut services: Vec<ServiceTranslation> = objs
        .services
        .iter()
        .map(|svc| {
            let key = ServiceKey::of(svc);
            let own = slices.get(&key).map(Vec::as_slice).unwrap_or_default();
            translate_service(svc, own, objs, node, opts)
        })
        .collect();
    services.sort_by(|a, b| a.order.cmp(&b.order));
    let mut arbiter = Arbiter::new(opts.capacity);
    let mut out = Translation::default();
    for t in &services {
        out.warnings.extend(t.warnings.iter().cloned());
        out.skipped.extend(t.skipped.iter().cloned());
        let (admitted, skipped) = arbiter.admit(t);
        out.skipped.extend(skipped);
        out.desired.services.extend(admitted);
    }
    out
}

/// Names a Service, and the EndpointSlices labelled with it: (namespace, name).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl ServiceKey {
    /// The key of `svc`.
    pub fn of(svc: &Service) -> Self {
        Self {
            namespace: svc.metadata.namespace.clone().unwrap_or_default(),
            name: svc.metadata.name.clone().unwrap_or_default(),
        }
    }

    /// The Service `slice` belongs to (its `kubernetes.io/service-name`
    /// label, in its namespace), if labelled.
    pub fn of_slice(slice: &EndpointSlice) -> Option<Self> {
        let labels = slice.metadata.labels.as_ref()?;
        Some(Self {
            namespace: slice.metadata.namespace.clone().unwrap_or_default(),
            name: labels.get(LABEL_SERVICE_NAME)?.clone(),
        })
    }
}

impl std::fmt::Display for ServiceKey {
    /// `namespace/name`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The EndpointSlices of each Service.
pub fn slices_by_service(slices: &[EndpointSlice]) -> BTreeMap<ServiceKey, Vec<&EndpointSlice>> {
    let mut out: BTreeMap<ServiceKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        if let Some(key) = ServiceKey::of_slice(slice) {
            out.entry(key).or_default().push(slice);
        }
    }
    out
}

/// Where a Service stands in [`older_first`] order: (no creation time,
/// creation time, namespace, name).
pub type OrderKey = (
    bool,
    Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    String,
    String,
);

/// The [`older_first`] key of `svc`.
pub fn order_key(svc: &Service) -> OrderKey {
    let created = svc.metadata.creation_timestamp.as_ref();
    (
        created.is_none(),
        created.cloned(),
        svc.metadata.namespace.clone().unwrap_or_default(),
        svc.metadata.name.clone().unwrap_or_default(),
    )
}

/// The order in which Services claim frontends and capacity: the older
/// `metadata.creationTimestamp` first (a Service without one counts as the
/// newest), then namespace, then name. Every node sees the same objects, so
/// every node (and every sync) picks the same winner, and a Service created
/// later can never take a frontend from one that already has it.
pub fn older_first(a: &Service, b: &Service) -> std::cmp::Ordering {
    order_key(a).cmp(&order_key(b))
}

/// A frontend's identity as claimed: (address, port, protocol).
pub type ClaimKey = (Ipv4Addr, u16, Proto);

/// One Service translated on its own, before it is weighed against the
/// others: what it asks for and what of it is invalid. A function of the
/// Service, its EndpointSlices and the node only, so it can be kept until
/// one of those changes.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceTranslation {
    /// Its place in [`older_first`] order.
    pub order: OrderKey,
    /// Its service ports that translate, in `spec.ports` order.
    pub ports: Vec<PortCandidate>,
    /// What of it is invalid or refused on its own.
    pub skipped: Vec<Skipped>,
    /// Things left out that a user may want to know about.
    pub warnings: Vec<String>,
}

impl ServiceTranslation {
    /// Every frontend its ports ask for.
    pub fn claim_keys(&self) -> impl Iterator<Item = ClaimKey> + '_ {
        self.ports
            .iter()
            .flat_map(|p| p.claims.iter().map(|c| c.frontend.key()))
    }

    /// What its ports would take of the maps if all were admitted.
    pub fn wants(&self) -> Capacity {
        let mut c = Capacity::ZERO;
        for p in self.ports.iter().filter(|p| !p.claims.is_empty()) {
            c.service_ports += 1;
            c.frontends += p.claims.len();
            c.backends += p.port.backends.len();
        }
        c
    }
}

/// One service port before arbitration.
#[derive(Clone, Debug, PartialEq)]
pub struct PortCandidate {
    /// Its name.
    pub name: ServicePortName,
    /// `spec.ports[index]`.
    index: usize,
    /// The frontends it asks for, each once (the first declaration wins),
    /// in declaration order.
    claims: Vec<Claim>,
    /// The service port, without frontends until admitted.
    port: ServicePort,
    /// The Service, and the file it came from, for reports.
    object: String,
    file: Option<std::path::PathBuf>,
}

impl PortCandidate {
    fn skip(&self, reason: SkipReason, (field, message): Bad) -> Skipped {
        Skipped {
            reason,
            part: SkippedPart::ServicePorts,
            object: self.object.clone(),
            file: self.file.clone(),
            field,
            message,
            service_ports: vec![self.name.to_string()],
        }
    }
}

/// Admits service ports in [`older_first`] order: a port whose frontend an
/// earlier port holds is left out whole (so that it never half-works), and
/// so is one that would not fit in the maps.
#[derive(Clone, Debug)]
pub struct Arbiter {
    capacity: Capacity,
    /// Which admitted service port holds each frontend.
    claims: BTreeMap<ClaimKey, ServicePortName>,
    /// What the admitted service ports take of the maps.
    used: Capacity,
}

impl Arbiter {
    /// Nothing admitted yet; at most `capacity`.
    pub fn new(capacity: Capacity) -> Self {
        Self {
            capacity,
            claims: BTreeMap::new(),
            used: Capacity::ZERO,
        }
    }

    /// Admits what of `t` does not collide with what is already admitted
    /// and fits; returns the admitted service ports and the ports left out.
    pub fn admit(
        &mut self,
        t: &ServiceTranslation,
    ) -> (Vec<(ServicePortName, ServicePort)>, Vec<Skipped>) {
        let mut admitted = Vec::new();
        let mut skipped = Vec::new();
        for c in &t.ports {
            let conflict = c.claims.iter().find_map(|cl| {
                let f = cl.frontend;
                self.claims.get(&f.key()).map(|owner| {
                    (
                        cl.field.clone(),
                        format!(
                            "frontend {}:{}/{} is already used by {owner}",
                            f.addr, f.port, f.proto
                        ),
                    )
                })
            });
            if let Some(bad) = conflict {
                skipped.push(c.skip(SkipReason::FrontendConflict, bad));
                continue;
            }
            let n_frontends = c.claims.len();
            let n_backends = c.port.backends.len();
            // A port without frontends is not written (plan leaves it out),
            // so it takes no capacity.
            if n_frontends > 0 {
                let cap = &self.capacity;
                let fits = self.used.service_ports < cap.service_ports
                    && self.used.frontends + n_frontends <= cap.frontends
                    && self.used.backends + n_backends <= cap.backends;
                if !fits {
                    let bad = (
                        format!("spec.ports[{}]", c.index),
                        format!(
                            "does not fit in the maps (at most {} service ports, {} frontends, \
                             {} backends); the newest services are left out",
                            cap.service_ports, cap.frontends, cap.backends
                        ),
                    );
                    skipped.push(c.skip(SkipReason::Capacity, bad));
                    continue;
                }
                self.used.service_ports += 1;
                self.used.frontends += n_frontends;
                self.used.backends += n_backends;
            }
            let mut port = c.port.clone();
            for cl in &c.claims {
                self.claims.insert(cl.frontend.key(), c.name.clone());
                port.frontends.insert(cl.frontend);
            }
            admitted.push((c.name.clone(), port));
        }
        (admitted, skipped)
    }

    /// Gives back what `admitted` (returned by [`Arbiter::admit`]) holds,
    /// so that its Service can be admitted again.
    pub fn release<'a>(
        &mut self,
        admitted: impl IntoIterator<Item = (&'a ServicePortName, &'a ServicePort)>,
    ) {
        for (name, sp) in admitted {
            for f in &sp.frontends {
                if self.claims.get(&f.key()) == Some(name) {
                    self.claims.remove(&f.key());
                }
            }
            if !sp.frontends.is_empty() {
                self.used.service_ports -= 1;
                self.used.frontends -= sp.frontends.len();
                self.used.backends -= sp.backends.len();
            }
        }
    }
}

/// Where a frontend came from, for reports.
#[derive(Clone, Debug, PartialEq)]
struct Claim {
    frontend: Frontend,
    field: String,
}

/// A field translation cannot use: (field path, what is wrong).
type Bad = (String, String);

/// What every port of a Service shares.
struct Common {
    affinity: SessionAffinity,
    traffic_policy: TrafficPolicy,
    source_ranges: Vec<Ipv4Cidr>,
    policy: BalancingPolicy,
    health_check_node_port: Option<u16>,
    /// Addresses besides node addresses that frontends open on, with the
    /// field declaring each.
    lb_ips: Vec<(Ipv4Addr, String)>,
    external_ips: Vec<(Ipv4Addr, String)>,
}

/// Which ports a Service of each type opens.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Exposure {
    /// `ClusterIP` with `spec.externalIPs`: those only.
    ExternalIps,
    /// `NodePort`: node ports and external IPs.
    NodePort,
    /// `LoadBalancer`: node ports (unless not allocated), load-balancer IPs
    /// and external IPs.
    LoadBalancer,
}

/// Translates one Service with its EndpointSlices (`slices`), on its own:
/// every field checked, every frontend it asks for, every backend. Whether
/// its frontends are free and whether it fits is the [`Arbiter`]'s call.
pub fn translate_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    objs: &Objects,
    node: &NodeContext,
    opts: &TranslateOptions,
) -> ServiceTranslation {
    let obj = ObjectRef::service(svc);
    let mut out = ServiceTranslation {
        order: order_key(svc),
        ports: Vec::new(),
        skipped: Vec::new(),
        warnings: Vec::new(),
    };
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
        tracing::debug!("{obj}: skipped (label {LABEL_SERVICE_PROXY_NAME})");
        return out;
    }
    let Some(spec) = &svc.spec else {
        return out;
    };
    let file = objs.origin(&obj).map(std::path::Path::to_path_buf);
    let ports = spec.ports.as_deref().unwrap_or_default();
    let spn_of = |port_name: &str| ServicePortName {
        namespace: obj.namespace.clone(),
        name: obj.name.clone(),
        port_name: port_name.to_owned(),
    };
    // Every service port of the Service, for reports about all of them.
    let all_ports: Vec<String> = {
        let names: BTreeSet<String> = ports
            .iter()
            .map(|p| spn_of(p.name.as_deref().unwrap_or_default()).to_string())
            .collect();
        if names.is_empty() {
            vec![spn_of("").to_string()]
        } else {
            names.into_iter().collect()
        }
    };
    let report = |reason, part, (field, message): Bad, service_ports| Skipped {
        reason,
        part,
        object: obj.to_string(),
        file: file.clone(),
        field,
        message,
        service_ports,
    };

    let has_external_ips = spec.external_ips.as_ref().is_some_and(|v| !v.is_empty());
    let exposure = match spec.type_.as_deref() {
        Some("ExternalName") => return out,
        // Reached through externalIPs only, as kube-proxy serves them.
        None | Some("ClusterIP") if has_external_ips => Exposure::ExternalIps,
        None | Some("ClusterIP") => return out,
        Some("NodePort") => Exposure::NodePort,
        Some("LoadBalancer") => Exposure::LoadBalancer,
        Some(other) => {
            let bad = (
                "spec.type".into(),
                format!(
                    "unknown type {other:?} (ClusterIP, NodePort, LoadBalancer or ExternalName)"
                ),
            );
            let s = report(
                SkipReason::Invalid,
                SkippedPart::ServicePorts,
                bad,
                all_ports,
            );
            out.skipped.push(s);
            return out;
        }
    };
    if spec.cluster_ip.as_deref() == Some("None") {
        tracing::debug!("{obj}: skipped (headless)");
        return out;
    }

    let common = match service_common(svc, &obj, exposure, &mut out.warnings) {
        Ok(c) => c,
        Err(bad) => {
            let s = report(
                SkipReason::Invalid,
                SkippedPart::ServicePorts,
                bad,
                all_ports,
            );
            out.skipped.push(s);
            return out;
        }
    };
    // An externalIP that is one of this node's addresses would let any
    // Service capture traffic meant for the node itself (its other
    // NodePorts, the kubelet, sshd): refused unless the operator allows it.
    let mut external_ips = Vec::new();
    for (addr, field) in common.external_ips.iter().cloned() {
        let is_node = node.node_addrs.contains(&addr) || opts.other_node_addrs.contains(&addr);
        if is_node && !opts.allow_external_ip_node_address {
            let bad = (
                field,
                format!(
                    "{addr} is an address of this node; refused so that a Service cannot \
                     capture the node's own traffic (--allow-external-ip-node-address accepts it)"
                ),
            );
            let s = report(
                SkipReason::ExternalIpIsNodeAddress,
                SkippedPart::Frontend,
                bad,
                all_ports.clone(),
            );
            out.skipped.push(s);
        } else {
            external_ips.push((addr, field));
        }
    }

    // Invalid EndpointSlice fields, by (object, field): reported once
    // whichever service ports read them.
    let mut slice_problems: BTreeMap<(String, String), Skipped> = BTreeMap::new();
    let mut seen_names = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let port_name = p.name.clone().unwrap_or_default();
        let spn = spn_of(&port_name);
        let skip_port = |out: &mut ServiceTranslation, bad: Bad| {
            let s = report(
                SkipReason::Invalid,
                SkippedPart::ServicePorts,
                bad,
                vec![spn.to_string()],
            );
            out.skipped.push(s);
        };
        if !seen_names.insert(port_name.clone()) {
            let bad = (
                format!("spec.ports[{i}].name"),
                format!("{port_name:?} is used by two ports"),
            );
            skip_port(&mut out, bad);
            continue;
        }
        let (proto, port, node_port) = match port_fields(i, p, exposure, spec) {
            Ok(Some(f)) => f,
            Ok(None) => {
                out.warnings
                    .push(format!("{spn}: SCTP is not supported; port skipped"));
                continue;
            }
            Err(bad) => {
                skip_port(&mut out, bad);
                continue;
            }
        };

        let mut wanted = Vec::new();
        if let Some(np) = node_port {
            for &addr in &node.node_addrs {
                wanted.push(Claim {
                    frontend: Frontend {
                        addr,
                        port: np,
                        proto,
                        kind: FrontendKind::NodePort,
                    },
                    field: format!("spec.ports[{i}].nodePort"),
                });
            }
        }
        for (list, kind) in [
            (&common.lb_ips, FrontendKind::LoadBalancer),
            (&external_ips, FrontendKind::ExternalIp),
        ] {
            for (addr, field) in list {
                wanted.push(Claim {
                    frontend: Frontend {
                        addr: *addr,
                        port,
                        proto,
                        kind,
                    },
                    field: field.clone(),
                });
            }
        }
        // A frontend declared twice by this port (e.g. an external IP that
        // is also the LB IP): the first declaration wins.
        let mut keys = BTreeSet::new();
        wanted.retain(|c| keys.insert(c.frontend.key()));

        let (mut backends, mut terminating_fallback) = backends_of(
            p.name.as_deref(),
            proto,
            slices,
            objs,
            node,
            &spn,
            &mut slice_problems,
        );
        if common.traffic_policy == TrafficPolicy::Local {
            // Only this node's endpoints; the KEP-1669 fallback applies
            // among them (kube-proxy's behaviour for eTP Local).
            backends.retain(|b| b.local);
            terminating_fallback = !backends.is_empty()
                && (terminating_fallback
                    || !backends.iter().any(|b| b.state == BackendState::Active));
            if !backends.iter().any(|b| b.state == BackendState::Active) {
                backends = backends
                    .into_iter()
                    .map(|b| Backend {
                        state: BackendState::Active,
                        ..b
                    })
                    .collect();
            }
        }
        out.ports.push(PortCandidate {
            name: spn,
            index: i,
            claims: wanted,
            port: ServicePort {
                frontends: BTreeSet::new(),
                backends,
                affinity: common.affinity,
                traffic_policy: common.traffic_policy,
                source_ranges: common.source_ranges.clone(),
                policy: common.policy,
                terminating_fallback,
                health_check_node_port: common.health_check_node_port,
            },
            object: obj.to_string(),
            file: file.clone(),
        });
    }
    out.skipped.extend(slice_problems.into_values());
    out
}

/// The Service-wide fields. An invalid one leaves the whole Service out:
/// ignoring only that field could open the service wider than its owner
/// asked (a source range, a traffic policy).
fn service_common(
    svc: &Service,
    obj: &ObjectRef,
    exposure: Exposure,
    warnings: &mut Vec<String>,
) -> std::result::Result<Common, Bad> {
    let Some(spec) = &svc.spec else {
        return Err(("spec".into(), "missing".into()));
    };
    let bad = |field: &str, msg: String| (field.to_owned(), msg);
    let affinity = match spec.session_affinity.as_deref() {
        None | Some("None") => SessionAffinity::None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            let timeout_s = match t {
                None => DEFAULT_AFFINITY_TIMEOUT_S,
                Some(t @ 1..=86_400) => t as u32,
                Some(t) => {
                    return Err(bad(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is out of range 1-86400"),
                    ));
                }
            };
            SessionAffinity::ClientIp { timeout_s }
        }
        Some(other) => {
            return Err(bad(
                "spec.sessionAffinity",
                format!("unknown value {other:?} (None or ClientIP)"),
            ));
        }
    };
    let traffic_policy = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => TrafficPolicy::Cluster,
        Some("Local") => TrafficPolicy::Local,
        Some(other) => {
            return Err(bad(
                "spec.externalTrafficPolicy",
                format!("unknown value {other:?} (Cluster or Local)"),
            ));
        }
    };
    let mut source_ranges = Vec::new();
    for (i, r) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        if let Some(cidr) =
            parse_cidr_v4(r).map_err(|m| bad(&format!("spec.loadBalancerSourceRanges[{i}]"), m))?
        {
            source_ranges.push(cidr);
        }
    }

    let policy = match svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_BALANCING))
    {
        None => BalancingPolicy::Maglev,
        Some(v) => BalancingPolicy::parse(v).unwrap_or_else(|| {
            warnings.push(format!(
                "{obj}: annotation {ANNOTATION_BALANCING}: unknown policy {v:?} \
                 (maglev, round-robin or least-connection); using maglev"
            ));
            BalancingPolicy::Maglev
        }),
    };

    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(p) if traffic_policy == TrafficPolicy::Local && exposure == Exposure::LoadBalancer => {
            Some(u16::try_from(p).map_err(|_| {
                bad(
                    "spec.healthCheckNodePort",
                    format!("{p} is out of range 1-65535"),
                )
            })?)
        }
        Some(_) => None,
    };

    let mut lb_ips = Vec::new();
    if exposure == Exposure::LoadBalancer {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        for (j, ing) in ingress.into_iter().flatten().enumerate() {
            let Some(ip) = &ing.ip else { continue };
            if ing.ip_mode.as_deref() == Some("Proxy") {
                tracing::debug!("{obj}: ingress {ip} has ipMode Proxy, not captured");
                continue;
            }
            let field = format!("status.loadBalancer.ingress[{j}].ip");
            if let Some(a) = parse_ip(ip).map_err(|m| bad(&field, m))? {
                lb_ips.push((a, field));
            }
        }
    }
    let mut external_ips = Vec::new();
    for (j, ip) in spec.external_ips.iter().flatten().enumerate() {
        let field = format!("spec.externalIPs[{j}]");
        if let Some(a) = parse_ip(ip).map_err(|m| bad(&field, m))? {
            external_ips.push((a, field));
        }
    }
    Ok(Common {
        affinity,
        traffic_policy,
        source_ranges,
        policy,
        health_check_node_port,
        lb_ips,
        external_ips,
    })
}

/// Protocol, port and nodePort of `spec.ports[i]`; `None` for an SCTP
/// port (not supported).
fn port_fields(
    i: usize,
    p: &k8s_openapi::api::core::v1::ServicePort,
    exposure: Exposure,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
) -> std::result::Result<Option<(Proto, u16, Option<u16>)>, Bad> {
    let proto = match p.protocol.as_deref() {
        None | Some("TCP") => Proto::Tcp,
        Some("UDP") => Proto::Udp,
        Some("SCTP") => return Ok(None),
        Some(other) => {
            return Err((
                format!("spec.ports[{i}].protocol"),
                format!("unknown protocol {other:?} (TCP, UDP or SCTP)"),
            ));
        }
    };
    let port = check_port(p.port).map_err(|m| (format!("spec.ports[{i}].port"), m))?;
    let node_port = match (exposure, p.node_port) {
        (Exposure::ExternalIps, _) => None,
        (_, Some(n)) => Some(check_port(n).map_err(|m| (format!("spec.ports[{i}].nodePort"), m))?),
        (Exposure::LoadBalancer, None) if spec.allocate_load_balancer_node_ports == Some(false) => {
            None
        }
        (_, None) => {
            return Err((
                format!("spec.ports[{i}].nodePort"),
                "missing (a NodePort or LoadBalancer service needs one)".into(),
            ));
        }
    };
    Ok(Some((proto, port, node_port)))
}

/// How usable an endpoint is; the better one wins when slices disagree.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Condition {
    ServingTerminating,
    Ready,
}

/// The backends of service port `spn`, merged over its slices, and whether
/// they are the serving-and-terminating fallback (no endpoint ready). An
/// invalid slice port or endpoint address is left out and reported (once,
/// in `problems`); the rest of the slice is used.
fn backends_of(
    port_name: Option<&str>,
    proto: Proto,
    slices: &[&EndpointSlice],
    objs: &Objects,
    node: &NodeContext,
    spn: &ServicePortName,
    problems: &mut BTreeMap<(String, String), Skipped>,
) -> (BTreeSet<Backend>, bool) {
    let mut merged: BTreeMap<(Ipv4Addr, u16), (Condition, Option<String>)> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let obj = ObjectRef::slice(slice);
        let mut problem = |field: String, message: String| {
            let s = problems
                .entry((obj.to_string(), field.clone()))
                .or_insert_with(|| Skipped {
                    reason: SkipReason::Invalid,
                    part: SkippedPart::Endpoints,
                    object: obj.to_string(),
                    file: objs.origin(&obj).map(std::path::Path::to_path_buf),
                    field,
                    message,
                    service_ports: Vec::new(),
                });
            let name = spn.to_string();
            if !s.service_ports.contains(&name) {
                s.service_ports.push(name);
            }
        };
        let found = slice.ports.iter().flatten().enumerate().find(|(_, sp)| {
            sp.name.as_deref().unwrap_or_default() == port_name.unwrap_or_default()
                && sp.protocol.as_deref().unwrap_or("TCP") == proto.to_string()
        });
        let Some((k, sp)) = found else { continue };
        // A nil port means "all ports": kube-proxy cannot use it either.
        let Some(port) = sp.port else { continue };
        let port = match check_port(port) {
            Ok(p) => p,
            Err(m) => {
                problem(format!("ports[{k}].port"), m);
                continue;
            }
        };
        for (e, ep) in slice.endpoints.iter().flatten().enumerate() {
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let cond = if ready {
                Condition::Ready
            } else if serving && terminating {
                Condition::ServingTerminating
            } else {
                continue;
            };
            // Only the first address has defined semantics.
            let Some(addr) = ep.addresses.first() else {
                continue;
            };
            let Ok(addr) = addr.parse::<Ipv4Addr>() else {
                problem(
                    format!("endpoints[{e}].addresses[0]"),
                    format!("{addr:?} is not an IPv4 address"),
                );
                continue;
            };
            let entry = merged
                .entry((addr, port))
                .or_insert((cond, ep.node_name.clone()));
            if cond > entry.0 {
                *entry = (cond, ep.node_name.clone());
            }
        }
    }
    let any_ready = merged.values().any(|(c, _)| *c == Condition::Ready);
    let fallback = !any_ready && !merged.is_empty();
    let set = merged
        .into_iter()
        .map(|((addr, port), (cond, node_name))| Backend {
            addr,
            port,
            state: match cond {
                Condition::ServingTerminating if any_ready => BackendState::Terminating,
                _ => BackendState::Active,
            },
            local: node_name.as_deref() == Some(node.node_name.as_str()),
            node_name,
        })
        .collect();
    (set, fallback)
}

/// A port number in 1..=65535.
fn check_port(p: i32) -> std::result::Result<u16, String> {
    match u16::try_from(p) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{p} is out of range 1-65535")),
    }
}

/// An IPv4 address, `None` for an IPv6 one (ignored for now).
fn parse_ip(s: &str) -> std::result::Result<Option<Ipv4Addr>, String> {
    match s.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => Ok(Some(a)),
        Ok(std::net::IpAddr::V6(_)) => Ok(None),
        Err(_) => Err(format!("{s:?} is not an IP address")),
    }
}

/// An IPv4 CIDR, `None` for an IPv6 one (ignored for now).
fn parse_cidr_v4(s: &str) -> std::result::Result<Option<Ipv4Cidr>, String> {
    let bad = || format!("{s:?} is not a CIDR (like 203.0.113.0/24)");
    let (addr, len) = s.trim().split_once('/').ok_or_else(bad)?;
    let Some(addr) = parse_ip(addr).map_err(|_| bad())? else {
        return Ok(None);
    };
    let prefix_len: u8 = len.parse().map_err(|_| bad())?;
    if prefix_len > 32 {
        return Err(bad());
    }
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0);
    Ok(Some(Ipv4Cidr {
        addr: Ipv4Addr::from(u32::from(addr) & mask),
        prefix_len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_cidrs() {
        assert_eq!(check_port(1), Ok(1));
        assert_eq!(check_port(65_535), Ok(65_535));
        assert!(check_port(0).is_err());
        assert_eq!(
            check_port(70_000).unwrap_err(),
            "70000 is out of range 1-65535"
        );
        assert_eq!(
            parse_cidr_v4("10.1.2.3/8").unwrap(),
            Some(Ipv4Cidr {
                addr: Ipv4Addr::new(10, 0, 0, 0),
                prefix_len: 8
            })
        );
        assert_eq!(parse_cidr_v4("0.0.0.0/0").unwrap().unwrap().prefix_len, 0);
        assert_eq!(parse_cidr_v4("2001:db8::/32").unwrap(), None);
        assert!(parse_cidr_v4("10.0.0.0/33").is_err());
        assert!(parse_cidr_v4("10.0.0.0").is_err());
    }
}
