//! A two-node lab: a client and two nodes on one L2 segment (a bridge in a
//! "wire" namespace), pods behind a bridge on each node, each node routing
//! the other's pod range, and `lb-agent` on both nodes. Like [`super::Lab`],
//! everything it creates carries the pid in its name and is removed on drop,
//! also while a panic unwinds.
//!
//! ```text
//!  <p>-client                  <p>-wire                <p>-a (node-a)                        <p>-a-pod<i>
//!  c0 198.18.0.2/24 ────── wc ┐                  ┌─ wa ── n0 198.18.0.1/24 (agent)
//!  (tx csum off, XDP pass)     ├── lan (bridge) ─┤         br0 198.18.1.1/24 ── p<i> ── eth0 198.18.1.(10+i)
//!                              │                 │         198.18.2.0/24 via 198.18.0.3
//!                              │                 └─ wb ── n0 198.18.0.3/24 (agent)   <p>-b-pod<i>
//!                              (wa, wb: XDP pass)          br0 198.18.2.1/24 ── p<i> ── eth0 198.18.2.(10+i)
//!                                                          198.18.1.0/24 via 198.18.0.1  (<p>-b: node-b)
//! ```
//!
//! Frames that XDP on a node sends back out of `n0` (`XDP_TX`) arrive on the
//! wire side's `wa`/`wb`, and answers to the client on `c0`: a veth delivers
//! such frames only when the receiving end has an XDP program, so these get
//! the pass-through XDP program of `lb-test-ebpf` ([`crate::xdp_pass`], links pinned under the lab's bpffs directory). Pods
//! and the client send with transmit checksum offload off, so that XDP on a
//! node sees full checksums also on packets that another node forwarded.

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use super::{
    Pod,
    agent::{self, Agent, AgentConfig, AgentSource},
    client, manifest,
    netns::{self, Netns},
    pins,
    server::Server,
};
use crate::topology::{self, Site, Wiring as _};

/// The client's address.
pub const CLIENT_ADDR: Ipv4Addr = super::CLIENT_ADDR;
/// A LoadBalancer ingress address reachable through either node (the
/// client routes it via one of them, see [`ClusterLab::route_vip_via`]).
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The nodes' interface on the wire, where the agents attach.
pub const NODE_IFACE: &str = super::NODE_IFACE;
/// The agents' metrics port.
pub const METRICS_PORT: u16 = 9995;

/// One of the two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeId {
    /// `node-a`, 198.18.0.1, pods 198.18.1.0/24.
    A,
    /// `node-b`, 198.18.0.3, pods 198.18.2.0/24.
    B,
}

impl NodeId {
    /// Both nodes.
    pub const ALL: [Self; 2] = [Self::A, Self::B];

    /// The node's name (`--node-name`, the endpoints' `nodeName`).
    pub fn name(self) -> &'static str {
        match self {
            Self::A => "node-a",
            Self::B => "node-b",
        }
    }

    /// `a` or `b`: in namespace names and pod labels.
    pub fn letter(self) -> char {
        match self {
            Self::A => 'a',
            Self::B => 'b',
        }
    }

    /// The node's address on the wire (its NodePort address).
    pub fn addr(self) -> Ipv4Addr {
        match self {
            Self::A => Ipv4Addr::new(198, 18, 0, 1),
            Self::B => Ipv4Addr::new(198, 18, 0, 3),
        }
    }

    /// The third octet of the node's pod range `198.18.<n>.0/24`.
    fn pod_net(self) -> u8 {
        match self {
            Self::A => 1,
            Self::B => 2,
        }
    }

    /// The node's pod range.
    pub fn pod_cidr(self) -> String {
        format!("198.18.{}.0/24", self.pod_net())
    }

    /// The node's address on its pod bridge (its pods' gateway).
    pub fn bridge_addr(self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.pod_net(), 1)
    }

    /// The other node.
    pub fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }

    /// The wire-side end of the node's veth (a port of the `lan` bridge).
    fn wire_port(self) -> String {
        format!("w{}", self.letter())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Pod `i` (1-based) of `node`: `198.18.<1|2>.(10+i)`.
pub fn pod_addr(node: NodeId, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, node.pod_net(), 10 + i)
}

/// The name pod `i` of `node` answers with: `pod-a1`, `pod-b2`, …
pub fn pod_label(node: NodeId, i: u8) -> String {
    format!("pod-{}{i}", node.letter())
}

/// The node and pod number of a label made by [`pod_label`].
pub fn parse_label(label: &str) -> Option<(NodeId, u8)> {
    let rest = label.strip_prefix("pod-")?;
    let node = match rest.chars().next()? {
        'a' => NodeId::A,
        'b' => NodeId::B,
        _ => return None,
    };
    Some((node, rest[1..].parse().ok()?))
}

/// `node`'s NodePort frontend.
pub fn nodeport(node: NodeId) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(node.addr(), manifest::NODE_PORT))
}

/// The LoadBalancer frontend `VIP:80`.
pub fn vip_frontend() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, 80))
}

/// Which services the manifest describes (see [`ClusterLab::write_manifest`]).
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    /// Pods of node A that are endpoints.
    pub a: Vec<u8>,
    /// Pods of node B that are endpoints.
    pub b: Vec<u8>,
}

impl Endpoints {
    /// Every pod of both nodes, `1..=n` on each.
    pub fn all(n: u8) -> Self {
        Self {
            a: (1..=n).collect(),
            b: (1..=n).collect(),
        }
    }

    fn list(&self) -> Vec<(Ipv4Addr, &'static str)> {
        let a = self.a.iter().map(|&i| (pod_addr(NodeId::A, i), "node-a"));
        let b = self.b.iter().map(|&i| (pod_addr(NodeId::B, i), "node-b"));
        a.chain(b).collect()
    }
}

/// One node: its namespace, pods and agent.
#[derive(Debug)]
struct Node {
    // Field order is drop order: agent, pods, then the namespace.
    agent: Option<Agent>,
    agent_args: Vec<String>,
    agent_runs: u32,
    pods: BTreeMap<u8, Pod>,
    ns: Netns,
}

/// The two-node lab. See the module documentation for the topology.
#[derive(Debug)]
pub struct ClusterLab {
    // Field order is drop order (after `Drop::drop`): nodes (agents, pods),
    // client, wire, then the site (pins, temporary directory).
    a: Node,
    b: Node,
    client: Netns,
    wire: Netns,
    pass_pins: Vec<PathBuf>,
    site: Site,
    manifest: PathBuf,
    agent_bin: PathBuf,
}

impl ClusterLab {
    /// Builds the lab with `pods` pods on each node, their servers, and the
    /// pass-through XDP programs on the wire ([`crate::xdp_pass`]). Needs
    /// root, `ip`, `ethtool`, `nsenter`, `sysctl` and the agent binary
    /// ([`agent::binary`], or `bin`).
    pub fn new(pods: u8, bin: Option<PathBuf>) -> Result<Self> {
        Self::build(pods, pods, bin, true)
    }

    /// Like [`ClusterLab::new`] with `pods_a` and `pods_b` pods, and
    /// without the pass-through XDP programs unless `xdp_pass` (plain
    /// routing needs none).
    pub fn build(pods_a: u8, pods_b: u8, bin: Option<PathBuf>, xdp_pass: bool) -> Result<Self> {
        topology::preflight("the cluster lab")?;
        let agent_bin = match bin {
            Some(bin) => bin,
            None => agent::binary()?,
        };
        netns::remove_stale();
        let site = Site::new("")?;
        site.create_pins()?;

        // Created in reverse drop order, each owned as soon as it exists, so
        // that an error half way removes what was made.
        let wire = site.netns("wire")?;
        let client = site.netns("client")?;
        let node = |id: NodeId| -> Result<Node> {
            Ok(Node {
                agent: None,
                agent_args: Vec::new(),
                agent_runs: 0,
                pods: BTreeMap::new(),
                ns: site.netns(&id.letter().to_string())?,
            })
        };
        let a = node(NodeId::A)?;
        let b = node(NodeId::B)?;
        let mut lab = Self {
            manifest: site.dir().join("services.yaml"),
            site,
            a,
            b,
            client,
            wire,
            pass_pins: Vec::new(),
            agent_bin,
        };
        lab.wire_up()?;
        for i in 1..=pods_a {
            lab.add_pod(NodeId::A, i)?;
        }
        for i in 1..=pods_b {
            lab.add_pod(NodeId::B, i)?;
        }
        if xdp_pass {
            lab.attach_pass_programs()?;
        }
        Ok(lab)
    }

    /// The wire bridge, the client and both nodes' links, addresses, routes.
    fn wire_up(&self) -> Result<()> {
        let wire = &self.wire;
        wire.bridge("lan", None, None)?;

        let client = &self.client;
        wire.veth("wc", client, "c0")?;
        wire.enslave("wc", "lan")?;
        client.addr_up("c0", CLIENT_ADDR, 24)?;
        // XDP on the nodes must see full checksums, not veth's partial ones.
        client.tx_checksum_off("c0")?;
        // The pod ranges, for plain routing checks (the NodePorts are on-link).
        for id in NodeId::ALL {
            client.route(&id.pod_cidr(), id.addr())?;
        }

        for id in NodeId::ALL {
            let ns = self.node(id);
            let port = id.wire_port();
            wire.veth(&port, ns, NODE_IFACE)?;
            wire.enslave(&port, "lan")?;
            ns.addr_up(NODE_IFACE, id.addr(), 24)?;
            // A fixed MAC address, as in the single-node lab: pods come and go.
            let mac = format!("02:00:c6:12:{:02x}:01", id.pod_net());
            ns.bridge("br0", Some(&mac), Some((id.bridge_addr(), 24)))?;
            ns.route(&id.other().pod_cidr(), id.other().addr())?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
        }
        Ok(())
    }

    /// The pass-through XDP program ([`crate::xdp_pass`]) on the wire
    /// ports of both nodes and on `c0`: every veth end that receives frames
    /// a node's XDP sends.
    fn attach_pass_programs(&mut self) -> Result<()> {
        let dir = self.site.pins().join("pass");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let targets = [
            (&self.wire, NodeId::A.wire_port()),
            (&self.wire, NodeId::B.wire_port()),
            (&self.client, "c0".to_owned()),
        ];
        for (ns, iface) in targets {
            let pin = dir.join(format!("{iface}-link"));
            let (i, p) = (iface.clone(), pin.clone());
            ns.run(move || crate::xdp_pass::attach_pinned(&i, &p))?
                .with_context(|| format!("the pass-through XDP program on {iface}"))?;
            self.pass_pins.push(pin);
        }
        Ok(())
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        match id {
            NodeId::A => &mut self.a,
            NodeId::B => &mut self.b,
        }
    }

    fn node_ref(&self, id: NodeId) -> &Node {
        match id {
            NodeId::A => &self.a,
            NodeId::B => &self.b,
        }
    }

    /// The unique prefix of this lab's names.
    pub fn prefix(&self) -> &str {
        self.site.prefix()
    }

    /// The client namespace.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The wire namespace (the `lan` bridge).
    pub fn wire(&self) -> &Netns {
        &self.wire
    }

    /// A node's namespace.
    pub fn node(&self, id: NodeId) -> &Netns {
        &self.node_ref(id).ns
    }

    /// The lab's temporary directory (manifest, agent logs).
    pub fn dir(&self) -> &Path {
        self.site.dir()
    }

    /// The agent binary.
    pub fn agent_bin(&self) -> &Path {
        &self.agent_bin
    }

    /// A node agent's `--bpffs-root`: `/sys/fs/bpf/<prefix>/<node-name>`.
    pub fn bpffs_root(&self, id: NodeId) -> PathBuf {
        self.site.pins().join(id.name())
    }

    /// Where map `name` of a node's agent is pinned.
    pub fn pin(&self, id: NodeId, name: &str) -> PathBuf {
        self.bpffs_root(id).join(lb_common::PIN_DIR).join(name)
    }

    /// Adds pod `i` to `node`: namespace, veth to the node's bridge (the
    /// pod's end with transmit checksum offload off), address, route, server.
    pub fn add_pod(&mut self, id: NodeId, i: u8) -> Result<()> {
        if self.node_ref(id).pods.contains_key(&i) {
            bail!("pod {} exists", pod_label(id, i));
        }
        let ns = self.site.netns(&format!("{}-pod{i}", id.letter()))?;
        let port = format!("p{i}");
        let (addr, gateway) = ((pod_addr(id, i), 24), id.bridge_addr());
        topology::plug_into_bridge(self.node(id), "br0", &port, &ns, addr, gateway)?;
        // The other node's XDP sees this pod's packets (replies to its SNAT
        // address): they must carry full checksums.
        ns.tx_checksum_off("eth0")?;
        let server = Server::start(&ns, &pod_label(id, i), manifest::POD_PORT)?;
        self.node_mut(id).pods.insert(i, Pod { server, ns });
        Ok(())
    }

    /// The pods of a node, by number.
    pub fn pods(&self, id: NodeId) -> &BTreeMap<u8, Pod> {
        &self.node_ref(id).pods
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn in_client<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.client.run(f)
    }

    /// Writes the `demo/echo` manifest (both agents read the same file) with
    /// `endpoints` and the Service variant `options`; returns its path.
    pub fn write_manifest(
        &self,
        endpoints: &Endpoints,
        options: &manifest::EchoOptions,
    ) -> Result<&Path> {
        let text = manifest::echo_service_with(&endpoints.list(), options);
        let tmp = self.manifest.with_extension("tmp");
        std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.manifest)?;
        Ok(&self.manifest)
    }

    /// Starts the agent of node `id` on the manifest (write it first) with
    /// `extra_args` after `run …`, and waits for its first sync. Each run
    /// logs to its own file (`lb-agent-<node>.<run>.log`).
    pub fn start_agent(&mut self, id: NodeId, extra_args: &[String]) -> Result<&mut Agent> {
        if self.node_ref(id).agent.is_some() {
            bail!("the agent of {id} is already running");
        }
        let root = self.bpffs_root(id);
        let manifest = self.manifest.clone();
        let bin = self.agent_bin.clone();
        let run = self.node_ref(id).agent_runs + 1;
        let log = self.dir().join(format!("lb-agent-{id}.{run}.log"));
        let node = self.node_mut(id);
        node.agent_runs = run;
        node.agent_args = extra_args.to_vec();
        let mut agent = Agent::spawn(
            &node.ns,
            &AgentConfig {
                bin: &bin,
                interfaces: &[NODE_IFACE],
                source: AgentSource::Manifests(&manifest),
                extra_args,
                node_name: id.name(),
                bpffs_root: &root,
                log: &log,
                wrapper: &[],
            },
        )?;
        agent.wait_for(agent::SYNCED, 1)?;
        Ok(node.agent.insert(agent))
    }

    /// Starts both agents with the same `extra_args`.
    pub fn start_agents(&mut self, extra_args: &[String]) -> Result<()> {
        for id in NodeId::ALL {
            self.start_agent(id, extra_args)?;
        }
        Ok(())
    }

    /// The running agent of node `id`.
    pub fn agent(&mut self, id: NodeId) -> Result<&mut Agent> {
        self.node_mut(id)
            .agent
            .as_mut()
            .with_context(|| format!("the agent of {id} is not running"))
    }

    /// SIGKILL for the agent of `id` (no cleanup, as a crash); returns its log.
    pub fn kill_agent(&mut self, id: NodeId) -> Result<String> {
        let mut agent = self
            .node_mut(id)
            .agent
            .take()
            .with_context(|| format!("the agent of {id} is not running"))?;
        agent.kill()?;
        Ok(agent.log())
    }

    /// Restarts the agent of `id` with the arguments of its last start.
    pub fn restart_agent(&mut self, id: NodeId) -> Result<&mut Agent> {
        let args = self.node_ref(id).agent_args.clone();
        self.start_agent(id, &args)
    }

    /// Sends SIGHUP to both running agents (re-read the manifest) and waits
    /// for their next sync.
    pub fn reload(&mut self) -> Result<()> {
        for id in NodeId::ALL {
            if let Some(agent) = self.node_mut(id).agent.as_mut() {
                agent.reload(agent::SYNCED)?;
            }
        }
        Ok(())
    }

    /// Every agent log of this lab (all runs), with headers.
    pub fn agent_logs(&self) -> String {
        let mut out = String::new();
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            out.push_str(&format!("----- {} -----\n{text}", log.display()));
        }
        out
    }

    /// `LB_STATS` of node `id`'s agent: each counter summed over the CPUs
    /// (through `bpftool -j map dump pinned`).
    pub fn stats(&self, id: NodeId) -> Result<BTreeMap<String, u64>> {
        super::read_stats(&self.pin(id, pins::STATS))
    }

    /// GET `/metrics` of node `id`'s agent, from the client.
    pub fn metrics(&self, id: NodeId) -> Result<String> {
        let addr = SocketAddr::V4(SocketAddrV4::new(id.addr(), METRICS_PORT));
        self.in_client(move || client::http_get_path(addr, "/metrics"))?
    }

    /// Gives each node a default route through the client's address, as a
    /// real node has one through its uplink: answers to addresses outside
    /// the lab (spoofed sources) leave through `n0` (where TC and XDP see
    /// them) instead of failing the node's route lookup, and a strict
    /// `rp_filter` would accept such sources on `n0`. The client does not
    /// forward: it drops what it receives for other addresses.
    pub fn route_default_via_client(&self) -> Result<()> {
        for id in NodeId::ALL {
            self.node(id).ip(&[
                "route",
                "replace",
                "default",
                "via",
                &CLIENT_ADDR.to_string(),
            ])?;
        }
        Ok(())
    }

    /// Routes the client's traffic to [`VIP`] through node `id`.
    pub fn route_vip_via(&self, id: NodeId) -> Result<()> {
        self.client.ip(&[
            "route",
            "replace",
            &format!("{VIP}/32"),
            "via",
            &id.addr().to_string(),
        ])
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        for id in NodeId::ALL {
            if let Some(mut agent) = self.node_mut(id).agent.take() {
                let _ = agent.stop();
            }
        }
        if failing {
            eprintln!(
                "cluster lab {}: agent logs:\n{}",
                self.site.prefix(),
                self.agent_logs()
            );
        }
        for id in NodeId::ALL {
            self.node_mut(id).pods.clear();
        }
        for pin in self.pass_pins.drain(..) {
            if let Err(e) = std::fs::remove_file(&pin) {
                eprintln!("cluster lab: cleanup: remove {}: {e}", pin.display());
            }
        }
        if failing && let Some(dir) = self.site.keep_dir() {
            eprintln!("cluster lab {}: kept {}", self.site.prefix(), dir.display());
        }
        // Nodes, client, wire and the site (pins, temporary directory) drop
        // next, in field order.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_addresses() {
        assert_eq!(pod_label(NodeId::B, 2), "pod-b2");
        assert_eq!(parse_label("pod-b2"), Some((NodeId::B, 2)));
        assert_eq!(parse_label("pod-a11"), Some((NodeId::A, 11)));
        assert_eq!(parse_label("pod-3"), None);
        assert_eq!(pod_addr(NodeId::A, 1), Ipv4Addr::new(198, 18, 1, 11));
        assert_eq!(pod_addr(NodeId::B, 2), Ipv4Addr::new(198, 18, 2, 12));
        assert_eq!(NodeId::A.other().addr(), Ipv4Addr::new(198, 18, 0, 3));
        let yaml = manifest::echo_service_with(
            &Endpoints {
                a: vec![1],
                b: vec![2],
            }
            .list(),
            &manifest::EchoOptions::default(),
        );
        assert!(yaml.contains("    - 198.18.2.12\n"));
        assert!(yaml.contains("nodeName: node-b"));
    }
}
