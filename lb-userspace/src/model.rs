//! The desired state: what the datapath should balance, as plain data.
//!
//! Produced by [`crate::translate`] from Kubernetes objects, consumed by
//! [`crate::plan`]. No Kubernetes types and no map layouts appear here, so
//! each side can change without the other. IPv4 only for now; IPv6 will add
//! `V6` twins of [`Frontend`] and [`Backend`] addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

/// Everything this node should balance, keyed by service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// One entry per (service, port) of every balanced service.
    pub services: BTreeMap<ServicePortName, ServicePort>,
}

/// Identity of one port of one service (kube-proxy's `ServicePortName`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
    /// `spec.ports[].name`; empty for the single unnamed port.
    pub port_name: String,
}

impl fmt::Display for ServicePortName {
    /// `ns/name:port_name`, or `ns/name` when the port is unnamed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port_name.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }
}

/// One balanced service port: where clients reach it and where it forwards.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePort {
    /// The destinations that reach this port; no two share (addr, port, proto).
    pub frontends: BTreeSet<Frontend>,
    /// The endpoints, local and remote; no two share (addr, port).
    pub backends: BTreeSet<Backend>,
    /// `spec.sessionAffinity: ClientIP`: the datapath keeps a client on its
    /// backend for the timeout (`LB_AFFINITY_V4`).
    pub affinity: SessionAffinity,
    /// `spec.externalTrafficPolicy`: with `Local`, only this node's
    /// endpoints are backends and the client's address is kept.
    pub traffic_policy: TrafficPolicy,
    /// `spec.loadBalancerSourceRanges` (the IPv4 ones), checked by the
    /// datapath on LoadBalancer addresses (`LB_SRC_RANGE_V4`). Empty: every
    /// source is allowed.
    pub source_ranges: Vec<Ipv4Cidr>,
    /// How a backend is picked for a new flow.
    pub policy: BalancingPolicy,
    /// No endpoint is ready: the Active backends are serving-and-terminating
    /// endpoints taken as a fallback (KEP-1669). The datapath records it as
    /// the reason of the flows it balances.
    pub terminating_fallback: bool,
    /// `spec.healthCheckNodePort` (LoadBalancer with `externalTrafficPolicy:
    /// Local`): the agent answers load-balancer health checks there.
    pub health_check_node_port: Option<u16>,
}

impl ServicePort {
    /// The backends that take new flows.
    pub fn active_backends(&self) -> impl Iterator<Item = &Backend> {
        self.backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
    }

    /// The ready endpoints on this node: what a `healthCheckNodePort`
    /// counts (kube-proxy's rule). Serving-and-terminating endpoints taken
    /// as the KEP-1669 fallback are Active but not ready: a node left with
    /// only those must fail its health check so that the load balancer
    /// drains it.
    pub fn ready_local_backends(&self) -> impl Iterator<Item = &Backend> {
        self.active_backends()
            .filter(|b| b.local && !self.terminating_fallback)
    }
}

/// One destination (address, port, protocol) that reaches a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    /// Destination address.
    pub addr: Ipv4Addr,
    /// Destination port.
    pub port: u16,
    /// Transport protocol.
    pub proto: Proto,
    /// How the frontend was declared.
    pub kind: FrontendKind,
}

impl Frontend {
    /// What makes two frontends the same destination: (address, port,
    /// protocol), whatever declared them.
    pub fn key(&self) -> (Ipv4Addr, u16, Proto) {
        (self.addr, self.port, self.proto)
    }
}

/// How a frontend was declared in the Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    /// `spec.ports[].nodePort` on a node address.
    NodePort,
    /// `status.loadBalancer.ingress[].ip` on `spec.ports[].port`.
    LoadBalancer,
    /// `spec.externalIPs[]` on `spec.ports[].port`.
    ExternalIp,
}

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP (the Kubernetes default).
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// IP protocol number (6 or 17), as stored in map keys.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::IPPROTO_TCP,
            Proto::Udp => lb_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    /// `TCP` or `UDP`, as Kubernetes spells them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// One endpoint of a service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    /// Pod address.
    pub addr: Ipv4Addr,
    /// Pod port (the EndpointSlice port number).
    pub port: u16,
    /// Whether it takes new flows.
    pub state: BackendState,
    /// `endpoints[].nodeName`, when the slice says.
    pub node_name: Option<String>,
    /// The endpoint runs on this node.
    pub local: bool,
}

impl Backend {
    /// The name Maglev hashes: `ip:port`. The same on every node.
    pub fn maglev_name(&self) -> String {
        format!("{}:{}", self.addr, self.port)
    }
}

/// Whether a backend takes new flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendState {
    /// Takes new flows and keeps its own.
    Active,
    /// Keeps the flows it has; takes no new ones.
    Terminating,
}

/// Session affinity of a service port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SessionAffinity {
    /// Every new flow is balanced on its own (default).
    #[default]
    None,
    /// A client keeps its backend for `timeout_s` seconds after its last flow.
    ClientIp {
        /// `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800).
        timeout_s: u32,
    },
}

/// `spec.externalTrafficPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TrafficPolicy {
    /// Any endpoint in the cluster (default).
    #[default]
    Cluster,
    /// Only endpoints on the receiving node; the client address is kept.
    Local,
}

/// How a backend is chosen for a new flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BalancingPolicy {
    /// Maglev consistent hashing of the flow's 5-tuple (default).
    #[default]
    Maglev,
    /// The usable backends in turn, one shared counter per service on the node.
    RoundRobin,
    /// The usable backend with the fewest open flows on this node.
    LeastConnection,
}

impl BalancingPolicy {
    /// The annotation value naming this policy.
    pub fn name(self) -> &'static str {
        match self {
            BalancingPolicy::Maglev => "maglev",
            BalancingPolicy::RoundRobin => "round-robin",
            BalancingPolicy::LeastConnection => "least-connection",
        }
    }

    /// The policy an annotation value names.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Maglev, Self::RoundRobin, Self::LeastConnection]
            .into_iter()
            .find(|p| p.name() == s.trim())
    }

    /// `ServiceValue::policy` code.
    pub fn code(self) -> u8 {
        match self {
            BalancingPolicy::Maglev => lb_common::POLICY_MAGLEV,
            BalancingPolicy::RoundRobin => lb_common::POLICY_ROUND_ROBIN,
            BalancingPolicy::LeastConnection => lb_common::POLICY_LEAST_CONN,
        }
    }
}

/// An IPv4 prefix, e.g. `203.0.113.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    /// Network address (host bits zero).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix_len: u8,
}

impl fmt::Display for Ipv4Cidr {
    /// `addr/prefix_len`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_display() {
        let mut n = ServicePortName {
            namespace: "demo".into(),
            name: "echo".into(),
            port_name: "http".into(),
        };
        assert_eq!(n.to_string(), "demo/echo:http");
        n.port_name.clear();
        assert_eq!(n.to_string(), "demo/echo");
        assert_eq!(Proto::Tcp.number(), 6);
        assert_eq!(Proto::Udp.number(), 17);
    }
}
