//! Kubernetes objects → desired state, with kube-proxy's semantics.
//!
//! * Services of `spec.type` NodePort and LoadBalancer are balanced;
//!   ClusterIP and ExternalName ones, headless ones (`clusterIP: None`) and
//!   ones labelled `service.kubernetes.io/service-proxy-name` (they belong to
//!   another proxy) are skipped.
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
//! * Endpoints on other nodes are kept with `local: false`; the planner
//!   leaves them out for now, and one warning per service port says so.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

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
}

/// Turns Services and EndpointSlices into the desired state of `node`.
///
/// Fails on the first invalid field (bad address, port out of range, missing
/// nodePort, frontend claimed by two service ports), naming the object and
/// the field (and the file, when the objects came from files).
pub fn translate(objs: &Objects, node: &NodeContext) -> Result<Translation> {
    let mut slices: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in &objs.slices {
        let labels = slice.metadata.labels.as_ref();
        if let Some(svc) = labels.and_then(|l| l.get(LABEL_SERVICE_NAME)) {
            let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
            slices.entry((ns, svc.as_str())).or_default().push(slice);
        }
    }

    let mut out = Translation::default();
    // Which service port claimed each (addr, port, proto).
    let mut claims: BTreeMap<(Ipv4Addr, u16, Proto), ServicePortName> = BTreeMap::new();
    for svc in &objs.services {
        let obj = ObjectRef::service(svc);
        let fail = |field: &str, msg: String| {
            Error::invalid(obj.to_string(), field, msg).in_file(objs.origin(&obj))
        };
        let svc_slices = slices
            .get(&(obj.namespace.as_str(), obj.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        translate_service(
            svc,
            &obj,
            svc_slices,
            objs,
            node,
            &mut claims,
            &mut out,
            &fail,
        )?;
    }
    Ok(out)
}

/// Where a frontend came from, for error messages.
struct Claim {
    frontend: Frontend,
    field: String,
}

#[expect(
    clippy::too_many_arguments,
    reason = "one private step of translate, sharing its state"
)]
fn translate_service(
    svc: &Service,
    obj: &ObjectRef,
    slices: &[&EndpointSlice],
    objs: &Objects,
    node: &NodeContext,
    claims: &mut BTreeMap<(Ipv4Addr, u16, Proto), ServicePortName>,
    out: &mut Translation,
    fail: &dyn Fn(&str, String) -> Error,
) -> Result<()> {
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
        tracing::debug!("{obj}: skipped (label {LABEL_SERVICE_PROXY_NAME})");
        return Ok(());
    }
    let Some(spec) = &svc.spec else {
        return Ok(());
    };
    let is_lb = match spec.type_.as_deref() {
        None | Some("ClusterIP" | "ExternalName") => return Ok(()),
        Some("NodePort") => false,
        Some("LoadBalancer") => true,
        Some(other) => {
            return Err(fail(
                "spec.type",
                format!(
                    "unknown type {other:?} (ClusterIP, NodePort, LoadBalancer or ExternalName)"
                ),
            ));
        }
    };
    if spec.cluster_ip.as_deref() == Some("None") {
        tracing::debug!("{obj}: skipped (headless)");
        return Ok(());
    }

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
                    return Err(fail(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is out of range 1-86400"),
                    ));
                }
            };
            SessionAffinity::ClientIp { timeout_s }
        }
        Some(other) => {
            return Err(fail(
                "spec.sessionAffinity",
                format!("unknown value {other:?} (None or ClientIP)"),
            ));
        }
    };
    let traffic_policy = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => TrafficPolicy::Cluster,
        Some("Local") => TrafficPolicy::Local,
        Some(other) => {
            return Err(fail(
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
            parse_cidr_v4(r).map_err(|m| fail(&format!("spec.loadBalancerSourceRanges[{i}]"), m))?
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
            out.warnings.push(format!(
                "{obj}: annotation {ANNOTATION_BALANCING}: unknown policy {v:?} \
                 (maglev, round-robin or least-connection); using maglev"
            ));
            BalancingPolicy::Maglev
        }),
    };

    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(p) if traffic_policy == TrafficPolicy::Local => {
            Some(u16::try_from(p).map_err(|_| {
                fail(
                    "spec.healthCheckNodePort",
                    format!("{p} is out of range 1-65535"),
                )
            })?)
        }
        Some(_) => None,
    };

    // Addresses that frontends are opened on, besides node addresses.
    let mut lb_ips = Vec::new();
    if is_lb {
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
            if let Some(a) = parse_ip(ip).map_err(|m| fail(&field, m))? {
                lb_ips.push((a, field));
            }
        }
    }
    let mut external_ips = Vec::new();
    for (j, ip) in spec.external_ips.iter().flatten().enumerate() {
        let field = format!("spec.externalIPs[{j}]");
        if let Some(a) = parse_ip(ip).map_err(|m| fail(&field, m))? {
            external_ips.push((a, field));
        }
    }

    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut seen_names = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let port_name = p.name.clone().unwrap_or_default();
        if !seen_names.insert(port_name.clone()) {
            return Err(fail(
                &format!("spec.ports[{i}].name"),
                format!("{port_name:?} is used by two ports"),
            ));
        }
        let spn = ServicePortName {
            namespace: obj.namespace.clone(),
            name: obj.name.clone(),
            port_name: port_name.clone(),
        };
        let proto = match p.protocol.as_deref() {
            None | Some("TCP") => Proto::Tcp,
            Some("UDP") => Proto::Udp,
            Some("SCTP") => {
                out.warnings
                    .push(format!("{spn}: SCTP is not supported; port skipped"));
                continue;
            }
            Some(other) => {
                return Err(fail(
                    &format!("spec.ports[{i}].protocol"),
                    format!("unknown protocol {other:?} (TCP, UDP or SCTP)"),
                ));
            }
        };
        let port = check_port(p.port).map_err(|m| fail(&format!("spec.ports[{i}].port"), m))?;
        let node_port = match p.node_port {
            Some(n) => {
                Some(check_port(n).map_err(|m| fail(&format!("spec.ports[{i}].nodePort"), m))?)
            }
            None if is_lb && spec.allocate_load_balancer_node_ports == Some(false) => None,
            None => {
                return Err(fail(
                    &format!("spec.ports[{i}].nodePort"),
                    "missing (a NodePort or LoadBalancer service needs one)".into(),
                ));
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
            (&lb_ips, FrontendKind::LoadBalancer),
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
        let mut frontends = BTreeSet::new();
        for Claim { frontend: f, field } in wanted {
            match claims.get(&(f.addr, f.port, f.proto)) {
                // Declared twice by this port (e.g. an external IP that is
                // also the LB IP): the first declaration wins.
                Some(owner) if *owner == spn => {}
                Some(owner) => {
                    return Err(fail(
                        &field,
                        format!(
                            "frontend {}:{}/{} is already used by {owner}",
                            f.addr, f.port, f.proto
                        ),
                    ));
                }
                None => {
                    claims.insert((f.addr, f.port, f.proto), spn.clone());
                    frontends.insert(f);
                }
            }
        }

        let (mut backends, mut terminating_fallback) =
            backends_of(p.name.as_deref(), proto, slices, objs, node)?;
        if traffic_policy == TrafficPolicy::Local {
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
        out.desired.services.insert(
            spn,
            ServicePort {
                frontends,
                backends,
                affinity,
                traffic_policy,
                source_ranges: source_ranges.clone(),
                policy,
                terminating_fallback,
                health_check_node_port,
            },
        );
    }
    Ok(())
}

/// How usable an endpoint is; the better one wins when slices disagree.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Condition {
    ServingTerminating,
    Ready,
}

/// The backends of one service port, merged over its slices, and whether
/// they are the serving-and-terminating fallback (no endpoint ready).
fn backends_of(
    port_name: Option<&str>,
    proto: Proto,
    slices: &[&EndpointSlice],
    objs: &Objects,
    node: &NodeContext,
) -> Result<(BTreeSet<Backend>, bool)> {
    let mut merged: BTreeMap<(Ipv4Addr, u16), (Condition, Option<String>)> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let obj = ObjectRef::slice(slice);
        let fail = |field: String, msg: String| {
            Error::invalid(obj.to_string(), field, msg).in_file(objs.origin(&obj))
        };
        let found = slice.ports.iter().flatten().enumerate().find(|(_, sp)| {
            sp.name.as_deref().unwrap_or_default() == port_name.unwrap_or_default()
                && sp.protocol.as_deref().unwrap_or("TCP") == proto.to_string()
        });
        let Some((k, sp)) = found else { continue };
        // A nil port means "all ports": kube-proxy cannot use it either.
        let Some(port) = sp.port else { continue };
        let port = check_port(port).map_err(|m| fail(format!("ports[{k}].port"), m))?;
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
            let addr: Ipv4Addr = addr.parse().map_err(|_| {
                fail(
                    format!("endpoints[{e}].addresses[0]"),
                    format!("{addr:?} is not an IPv4 address"),
                )
            })?;
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
    Ok((set, fallback))
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
