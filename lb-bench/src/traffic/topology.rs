//! The traffic bench's namespaces, built fresh for every measurement so that
//! nothing (rules, conntrack entries, TIME_WAIT sockets, pinned maps) leaks
//! from one system to the next.
//!
//! ```text
//!  <p>-client           <p>-node                           <p>-pod<k>, k = 0..4
//!  c0 198.18.0.2/30 ─── n0 198.18.0.1/30  (NodePort address;
//!  (tx csum off)           XDP + TC of lb-agent, or kube-proxy's rules)
//!                       p<k> 198.18.0.(4k+5)/30 ──────── eth0 198.18.0.(4k+6)/30
//!                       route 198.19.k.0/24 via the pod  local 198.19.k.0/24 dev lo
//!                       ip_forward=1                     TCP server 0.0.0.0:8080
//! ```
//!
//! Each pod namespace owns the whole `198.19.k.0/24` through a `local` route
//! (the node routes the /24 to the pod's link address, so no neighbour entry
//! per address): endpoint `j` is `198.19.(j mod 4).(2 + j div 4)`, so up to
//! 1,000 endpoints spread over 4 namespaces, and one server per namespace
//! answers on all of them. The node has no default route: the services
//! axis's other services, whose endpoints never receive traffic, point to
//! addresses in `198.18.1.0`–`198.18.255.255` that lead nowhere.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    counters::Snapshot,
    server::{Served, Server},
};
use lb_testkit::{
    lab::{
        self,
        agent::{Agent, AgentConfig, AgentSource},
        netns::Netns,
    },
    topology::{Batch, Site, Wiring as _},
};

use crate::kubeproxy::{self, BenchService, Mode, NodeInfo};

/// The client's address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The node's address on the client link: the NodePort address.
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The node's interface towards the client (where the agent attaches).
pub const NODE_IFACE: &str = "n0";
/// The client's interface.
pub const CLIENT_IFACE: &str = "c0";
/// Pod namespaces (endpoints are spread over them round robin).
pub const POD_NAMESPACES: usize = 4;
/// Addresses used per pod namespace (`.2` to `.251`).
pub const ADDRS_PER_POD: usize = 250;
/// The most endpoints that really answer.
pub const MAX_ENDPOINTS: usize = POD_NAMESPACES * ADDRS_PER_POD;
/// The port the servers listen on (kube-proxy module's target port).
pub const POD_PORT: u16 = kubeproxy::TARGET_PORT;

/// The systems compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// lb-agent: XDP DNAT + TC reply rewrite on `n0`.
    Xdp,
    /// kube-proxy's iptables-mode rules (`iptables-restore`).
    Iptables,
    /// kube-proxy's nftables-mode rules (`nft -f`).
    Nftables,
    /// No load balancer: the client connects to the pod addresses.
    NoLb,
    /// No load balancer, but a pass-only XDP program (`lb_testkit::xdp_pass`)
    /// on the node's client-side veth: what native XDP mode alone costs on
    /// a veth (it makes the veth copy every cloned or headroom-short skb
    /// into a new page before the program runs), separated from what the
    /// load balancer's own program costs.
    NoLbXdpPass,
}

impl System {
    /// Every system, in the order rows are reported.
    pub const ALL: [Self; 4] = [Self::Xdp, Self::Iptables, Self::Nftables, Self::NoLb];

    /// Its name in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::NoLb => "nolb",
            Self::NoLbXdpPass => "nolb_xdp_pass",
        }
    }
}

/// The address of answering endpoint `j` (`j < MAX_ENDPOINTS`).
pub fn endpoint(j: usize) -> Ipv4Addr {
    assert!(j < MAX_ENDPOINTS, "endpoint {j}: at most {MAX_ENDPOINTS}");
    Ipv4Addr::new(
        198,
        19,
        (j % POD_NAMESPACES) as u8,
        (2 + j / POD_NAMESPACES) as u8,
    )
}

/// An address that never answers, for endpoint `j` of a service `i > 0` of
/// the services axis (65,280 distinct ones, then they repeat).
pub fn silent_endpoint(i: usize, j: usize) -> Ipv4Addr {
    const SPAN: usize = 255 * 256;
    let k = (i * 10 + j) % SPAN;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 1, 0)) + k as u32)
}

/// The node's and the pod's address on pod `k`'s link.
fn pod_link(k: usize) -> (Ipv4Addr, Ipv4Addr) {
    let base = 4 + 4 * k as u8;
    (
        Ipv4Addr::new(198, 18, 0, base + 1),
        Ipv4Addr::new(198, 18, 0, base + 2),
    )
}

/// The node as the kube-proxy module and the agent see it.
pub fn node_info() -> NodeInfo {
    NodeInfo {
        name: lab::manifest::NODE_NAME.into(),
        addr: NODE_ADDR,
    }
}

/// The client-side sysctls (identical for every system).
pub const CLIENT_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.ip_local_port_range", "1024 65535"),
    ("net.ipv4.tcp_tw_reuse", "1"),
];

/// One topology; everything is removed on drop.
#[derive(Debug)]
pub struct Topology {
    agent: Option<Agent>,
    servers: Vec<Server>,
    pods: Vec<Netns>,
    client: Netns,
    node: Netns,
    // Prefix `lbt-<pid>-t<n>`, pins (removed first, by `Drop::drop`) and
    // temporary directory: dropped after the namespaces.
    site: Site,
}

impl Topology {
    /// Builds the namespaces and starts a TCP server in each pod namespace,
    /// and, with `udp`, UDP echo sockets on those endpoint addresses.
    pub fn build(udp: &[Ipv4Addr]) -> Result<Self> {
        let site = Site::new("t")?;
        let node = site.netns("node")?;
        let client = site.netns("client")?;
        let mut topo = Self {
            agent: None,
            servers: Vec::new(),
            pods: Vec::new(),
            client,
            node,
            site,
        };
        for k in 0..POD_NAMESPACES {
            topo.pods.push(topo.site.netns(&format!("pod{k}"))?);
        }
        let (node, client) = (&topo.node, &topo.client);
        // One `ip -batch` per namespace: a few processes instead of dozens.
        let batch = Batch::new(node);
        batch.veth(NODE_IFACE, client, CLIENT_IFACE)?;
        batch.addr_up(NODE_IFACE, NODE_ADDR, 30)?;
        for (k, pod) in topo.pods.iter().enumerate() {
            let (node_side, pod_side) = pod_link(k);
            let port = format!("p{k}");
            batch.veth(&port, pod, "eth0")?;
            batch.addr_up(&port, node_side, 30)?;
            batch.route(&format!("198.19.{k}.0/24"), pod_side)?;
        }
        batch.run()?;
        let batch = Batch::new(client);
        batch.addr_up(CLIENT_IFACE, CLIENT_ADDR, 30)?;
        batch.route("default", NODE_ADDR)?;
        batch.run()?;
        // XDP on the node must see full checksums (see the kernel notes);
        // off for every system alike.
        client.tx_checksum_off(CLIENT_IFACE)?;
        client.write_sysctls(CLIENT_SYSCTLS)?;
        node.write_sysctls(&[("net.ipv4.ip_forward", "1")])?;
        for (k, pod) in topo.pods.iter().enumerate() {
            let (node_side, pod_side) = pod_link(k);
            let batch = Batch::new(pod);
            batch.addr_up("eth0", pod_side, 30)?;
            batch.route("default", node_side)?;
            let owned = format!("198.19.{k}.0/24");
            batch.ip(&["route", "add", "local", &owned, "dev", "lo"])?;
            batch.run()?;
        }
        for (k, pod) in topo.pods.iter().enumerate() {
            topo.servers.push(Server::tcp(pod, POD_PORT)?);
            let mine: Vec<Ipv4Addr> = udp
                .iter()
                .copied()
                .filter(|a| a.octets()[..3] == [198, 19, k as u8])
                .collect();
            if !mine.is_empty() {
                topo.servers.push(Server::udp(pod, &mine, POD_PORT)?);
            }
        }
        Ok(topo)
    }

    /// Installs `system` for `svcs` (nothing for [`System::NoLb`]) and
    /// returns how long that took (the agent: spawn to its first sync and
    /// attach).
    pub fn install(
        &mut self,
        system: System,
        svcs: &[BenchService],
        agent_bin: &Path,
    ) -> Result<Duration> {
        let started = Instant::now();
        match system {
            System::NoLb => {}
            System::NoLbXdpPass => {
                let pin = self.site.create_pins()?.join("xdp-pass-link");
                self.node
                    .run(move || lb_testkit::xdp_pass::attach_pinned(NODE_IFACE, &pin))?
                    .context("the pass-through XDP program on n0")?;
            }
            System::Iptables => {
                kubeproxy::install(&self.node, Mode::Iptables, svcs, &node_info())?;
            }
            System::Nftables => {
                kubeproxy::install(&self.node, Mode::Nftables, svcs, &node_info())?;
            }
            System::Xdp => {
                if self.agent.is_some() {
                    bail!("the agent is already running");
                }
                let manifests = self.site.dir().join("services.json");
                kubeproxy::write_manifests(&manifests, svcs, &node_info())?;
                let log = self.site.dir().join("lb-agent.log");
                let extra = crate::xdp_agent_args();
                let agent = Agent::start(
                    &self.node,
                    &AgentConfig {
                        bin: agent_bin,
                        interfaces: &[NODE_IFACE],
                        source: AgentSource::Manifests(&manifests),
                        extra_args: &extra,
                        node_name: lab::manifest::NODE_NAME,
                        bpffs_root: self.site.pins(),
                        log: &log,
                        wrapper: &[],
                    },
                )?;
                self.agent = Some(agent);
            }
        }
        Ok(started.elapsed())
    }

    /// The client namespace.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The node namespace.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// Every counter, now.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let agent = self.agent.as_ref().and_then(Agent::pid);
        Snapshot::take(&self.client, &self.node, &self.pods, agent)
    }

    /// Answers per serving address since the last call, all servers.
    pub fn take_served(&self) -> Served {
        let mut all = Served::new();
        for s in &self.servers {
            for (a, n) in s.take_served() {
                *all.entry(a).or_default() += n;
            }
        }
        all
    }

    /// The agent's log (empty without an agent).
    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(Agent::log).unwrap_or_default()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take()
            && let Err(e) = agent.stop()
        {
            eprintln!("traffic: stopping lb-agent: {e:#}");
        }
        self.servers.clear();
        if let Err(e) = self.site.remove_pins() {
            eprintln!("traffic: {e:#}");
        }
        // The namespaces go next (field order): with the node namespace go
        // its rules and its conntrack entries.
    }
}

/// `addr:port` targets.
pub fn targets(addrs: &[Ipv4Addr], port: u16) -> Vec<SocketAddrV4> {
    addrs.iter().map(|&a| SocketAddrV4::new(a, port)).collect()
}
