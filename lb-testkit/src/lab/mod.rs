//! A network-namespace lab: a client, a node running `lb-agent`, and pods
//! behind a bridge on the node. Everything it creates is removed on drop
//! (also while a panic unwinds); names carry the pid so that runs do not
//! collide, and leftovers of crashed runs are removed at start.
//!
//! ```text
//!  <p>-client             <p>-node                          <p>-pod<i>
//!  c0 198.18.0.2/24 ──── n0 198.18.0.1/24  (XDP + TC)
//!  (tx csum off)          br0 198.18.1.1/24 ── p<i> ─────── eth0 198.18.1.(10+i)/24
//!                         ip_forward=1                      server :8080 tcp+udp
//! ```
//!
//! Servers and clients are threads of this process that entered the
//! namespace ([`netns::in_netns`]); only the agent is a separate process.

pub mod agent;
pub mod client;
pub mod cluster;
pub mod manifest;
pub mod server;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context as _, Result, bail};

use self::{
    agent::{Agent, AgentConfig, AgentSource},
    manifest::Condition,
    server::Server,
};
use crate::netns::Netns;
use crate::topology::{self, Site, Wiring as _};

pub use crate::netns::{self, BPFFS};

/// The node's address on the client link: the NodePort frontend.
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The client's address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The node's address on the pod bridge (the pods' default gateway).
pub const BRIDGE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The MAC address of the node's pod bridge (locally administered).
pub const BRIDGE_MAC: &str = "02:00:c6:12:01:01";
/// The node's interface towards the client, where the agent attaches.
pub const NODE_IFACE: &str = "n0";
/// Map pin names (files under `<bpffs-root>/<PIN_DIR>/`): the agent's own.
pub use lb_common::consts::pin as pins;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Asks every lab loop to stop at its next check (the demo's Ctrl-C handler).
pub fn request_stop() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether [`request_stop`] was called.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The address of pod `i` (1-based): `198.18.1.(10+i)`.
pub fn pod_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, 10 + i)
}

/// The name pod `i` answers with.
pub fn pod_label(i: u8) -> String {
    format!("pod-{i}")
}

/// `LB_STATS` pinned at `pin`: each counter summed over the CPUs (through
/// `bpftool -j map dump pinned`).
pub fn read_stats(pin: &Path) -> Result<BTreeMap<String, u64>> {
    let json = crate::cmd::output(
        std::process::Command::new(crate::cmd::program("bpftool"))
            .args(["-j", "map", "dump", "pinned"])
            .arg(pin),
    )?;
    let value: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("parse bpftool dump of {}", pin.display()))?;
    let mut sums = BTreeMap::new();
    for entry in value.as_array().into_iter().flatten() {
        // Per-CPU maps: raw bytes in `values`, named fields (BTF) in
        // `formatted.values`.
        let entry = entry.get("formatted").unwrap_or(entry);
        for cpu in entry["values"].as_array().into_iter().flatten() {
            for (name, v) in cpu["value"].as_object().into_iter().flatten() {
                if let Some(n) = v.as_u64() {
                    *sums.entry(name.clone()).or_insert(0) += n;
                }
            }
        }
    }
    if sums.is_empty() {
        bail!(
            "no counters in the bpftool dump of {}:\n{json}",
            pin.display()
        );
    }
    Ok(sums)
}

/// The NodePort frontend as seen from the client.
pub fn frontend() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(NODE_ADDR, manifest::NODE_PORT))
}

/// A pod: its namespace and its server.
#[derive(Debug)]
pub struct Pod {
    // Field order is drop order: stop the server, then delete the namespace.
    server: Server,
    ns: Netns,
}

impl Pod {
    /// The pod's namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The pod's server.
    pub fn server(&self) -> &Server {
        &self.server
    }
}

/// The lab. See the module documentation for the topology.
#[derive(Debug)]
pub struct Lab {
    agent: Option<Agent>,
    pods: BTreeMap<u8, Pod>,
    extra_servers: Vec<Server>,
    client: Netns,
    node: Netns,
    // Prefix, pins and temporary directory: dropped after the namespaces.
    site: Site,
    manifest: PathBuf,
    agent_bin: Option<PathBuf>,
}

impl Lab {
    /// Builds client, node and pods `1..=pods` with their servers. Needs
    /// root, `ip`, `ethtool`, `nsenter` and `sysctl` ([`topology::preflight`]).
    /// The client's veth sends full checksums (transmit offload off), which
    /// native XDP on the node needs.
    pub fn new(pods: u8) -> Result<Self> {
        Self::build(pods, false)
    }

    /// As [`Lab::new`], with the client's transmit checksum offload left on,
    /// as a real veth has it: its TCP and UDP packets carry partial
    /// checksums (`CHECKSUM_PARTIAL`), which only TC ingress handles.
    pub fn with_tx_offload(pods: u8) -> Result<Self> {
        Self::build(pods, true)
    }

    fn build(pods: u8, tx_offload: bool) -> Result<Self> {
        topology::preflight("the lab")?;
        netns::remove_stale();
        let site = Site::new("")?;

        let node = site.netns("node")?;
        let client = site.netns("client")?;
        node.veth(NODE_IFACE, &client, "c0")?;

        client.addr_up("c0", CLIENT_ADDR, 24)?;
        client.route("default", NODE_ADDR)?;
        if !tx_offload {
            // XDP on the node must see full checksums, not veth's partial ones.
            client.tx_checksum_off("c0")?;
        }

        node.addr_up(NODE_IFACE, NODE_ADDR, 24)?;
        // A fixed address: a bridge otherwise takes the lowest address of
        // its ports, so adding or removing a pod could change the pods'
        // gateway under their neighbour caches and lose their replies until
        // they re-resolve it.
        node.bridge("br0", Some(BRIDGE_MAC), Some((BRIDGE_ADDR, 24)))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;

        let mut lab = Self {
            manifest: site.dir().join("services.yaml"),
            site,
            agent: None,
            pods: BTreeMap::new(),
            extra_servers: Vec::new(),
            client,
            node,
            agent_bin: None,
        };
        for i in 1..=pods {
            lab.add_pod(i)?;
        }
        Ok(lab)
    }

    /// The unique prefix of this lab's names.
    pub fn prefix(&self) -> &str {
        self.site.prefix()
    }

    /// The client namespace.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The node namespace.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The agent's `--bpffs-root`: `/sys/fs/bpf/<prefix>`.
    pub fn bpffs_root(&self) -> &Path {
        self.site.pins()
    }

    /// Where map `name` is pinned: `<bpffs-root>/v5/<name>`.
    pub fn pin(&self, name: &str) -> PathBuf {
        self.bpffs_root().join(lb_common::PIN_DIR).join(name)
    }

    /// The lab's temporary directory (manifests, agent log).
    pub fn dir(&self) -> &Path {
        self.site.dir()
    }

    /// Adds pod `i`: namespace, veth to the bridge, address, route, server.
    pub fn add_pod(&mut self, i: u8) -> Result<()> {
        self.add_pod_labelled(i, &pod_label(i))
    }

    /// Like [`Lab::add_pod`], with a server that answers as `label` (tell a
    /// pod recreated at the same address from the one it replaces).
    pub fn add_pod_labelled(&mut self, i: u8, label: &str) -> Result<()> {
        if self.pods.contains_key(&i) {
            bail!("pod {i} exists");
        }
        let ns = self.site.netns(&format!("pod{i}"))?;
        let port = format!("p{i}");
        let addr = (pod_addr(i), 24);
        topology::plug_into_bridge(&self.node, "br0", &port, &ns, addr, BRIDGE_ADDR)?;
        // A pod recreated at an old address has a new MAC address: forget
        // the old one, which the node would otherwise keep using until its
        // neighbour entry went stale (tens of seconds), as if the pod were
        // unreachable. (`ip neigh flush` succeeds when there is none.)
        self.node.ip(&[
            "neigh",
            "flush",
            "to",
            &pod_addr(i).to_string(),
            "dev",
            "br0",
        ])?;
        let server = Server::start(&ns, label, manifest::POD_PORT)?;
        self.pods.insert(i, Pod { server, ns });
        Ok(())
    }

    /// Removes pod `i` (stops its server, deletes its namespace and veth).
    ///
    /// The veth is deleted first, explicitly: a socket still open in the
    /// pod (a connection thread of its server, an orphaned TCP socket
    /// retransmitting its FIN) keeps a deleted namespace, and its interfaces,
    /// alive, and a pod added again at that number needs the name `p<i>`.
    pub fn remove_pod(&mut self, i: u8) {
        if self.pods.contains_key(&i)
            && let Err(e) = self.node.ip(&["link", "del", &format!("p{i}")])
        {
            eprintln!("lab: removing pod {i}: {e:#}");
        }
        self.pods.remove(&i);
    }

    /// The pods, by number.
    pub fn pods(&self) -> &BTreeMap<u8, Pod> {
        &self.pods
    }

    /// Starts a server answering as `label` on TCP and UDP `port` in the node
    /// namespace (non-service traffic); it lives as long as the lab.
    pub fn start_node_server(&mut self, label: &str, port: u16) -> Result<()> {
        let server = Server::start(&self.node, label, port)?;
        self.extra_servers.push(server);
        Ok(())
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn in_client<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.client.run(f)
    }

    /// Writes the generated `demo/echo` manifest with the given pods as
    /// endpoints to the lab's manifest file, and returns its path.
    pub fn write_manifest(&self, pods: &[u8]) -> Result<&Path> {
        let addrs: Vec<Ipv4Addr> = pods.iter().map(|&i| pod_addr(i)).collect();
        self.write_manifest_text(&manifest::echo_service(&addrs))
    }

    /// Writes the `demo/echo` manifest with pod `i`'s endpoint in the given
    /// condition, for each `(i, condition)` of `endpoints`.
    pub fn write_manifest_conditions(&self, endpoints: &[(u8, Condition)]) -> Result<&Path> {
        let endpoints: Vec<(Ipv4Addr, &str, Condition)> = endpoints
            .iter()
            .map(|&(i, c)| (pod_addr(i), manifest::NODE_NAME, c))
            .collect();
        self.write_manifest_text(&manifest::echo_service_conditions(
            &endpoints,
            &manifest::EchoOptions::default(),
        ))
    }

    /// Writes `text` to the lab's manifest file.
    pub fn write_manifest_text(&self, text: &str) -> Result<&Path> {
        // Write then rename: the agent never reads half a file.
        let tmp = self.manifest.with_extension("tmp");
        std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.manifest)?;
        Ok(&self.manifest)
    }

    /// Uses `bin` as the agent instead of [`agent::binary`]'s choice.
    pub fn set_agent_bin(&mut self, bin: PathBuf) {
        self.agent_bin = Some(bin);
    }

    /// Starts the agent on the lab's manifest file (write it first) and waits
    /// for its first sync.
    pub fn start_agent(&mut self) -> Result<&mut Agent> {
        let manifest = self.manifest.clone();
        self.start_agent_with(&manifest)
    }

    /// Starts the agent on `manifests` (a file or directory) and waits for
    /// its first sync.
    pub fn start_agent_with(&mut self, manifests: &Path) -> Result<&mut Agent> {
        self.start_agent_from(AgentSource::Manifests(manifests), &[])
    }

    /// Starts the agent on `source` with `extra_args` and waits for its first
    /// sync.
    pub fn start_agent_from(
        &mut self,
        source: AgentSource<'_>,
        extra_args: &[String],
    ) -> Result<&mut Agent> {
        let agent = self.spawn_agent_from(source, extra_args)?;
        agent.wait_for(agent::SYNCED, 1)?;
        Ok(agent)
    }

    /// Starts the agent on `source` and waits only until it has attached
    /// (a Kubernetes agent syncs once it has listed everything).
    pub fn spawn_agent_from(
        &mut self,
        source: AgentSource<'_>,
        extra_args: &[String],
    ) -> Result<&mut Agent> {
        if self.agent.is_some() {
            bail!("the agent is already running");
        }
        let bin = match &self.agent_bin {
            Some(bin) => bin.clone(),
            None => agent::binary()?,
        };
        let log = self.dir().join("lb-agent.log");
        let agent = Agent::spawn(
            &self.node,
            &AgentConfig {
                bin: &bin,
                interfaces: &[NODE_IFACE],
                source,
                extra_args,
                node_name: manifest::NODE_NAME,
                bpffs_root: self.bpffs_root(),
                log: &log,
                wrapper: &[],
            },
        )?;
        Ok(self.agent.insert(agent))
    }

    /// The running agent.
    pub fn agent(&mut self) -> Result<&mut Agent> {
        self.agent.as_mut().context("the agent is not running")
    }

    /// Rewrites the manifest with `pods` as endpoints, sends SIGHUP and waits
    /// for the agent's next `synced` line.
    pub fn reload(&mut self, pods: &[u8]) -> Result<()> {
        self.write_manifest(pods)?;
        self.agent()?.reload(agent::SYNCED)
    }

    /// Like [`Lab::reload`], with each endpoint's condition.
    pub fn reload_conditions(&mut self, endpoints: &[(u8, Condition)]) -> Result<()> {
        self.write_manifest_conditions(endpoints)?;
        self.agent()?.reload(agent::SYNCED)
    }

    /// Kills the agent with SIGKILL (no cleanup, as a crash) and returns its log.
    pub fn kill_agent(&mut self) -> Result<String> {
        let mut agent = self.agent.take().context("the agent is not running")?;
        agent.kill()?;
        Ok(agent.log())
    }

    /// Stops the agent (SIGTERM, then SIGKILL after 5 s) and returns its log.
    pub fn stop_agent(&mut self) -> Result<String> {
        let mut agent = self.agent.take().context("the agent is not running")?;
        agent.stop()?;
        Ok(agent.log())
    }

    /// `LB_STATS`: each counter summed over the CPUs.
    pub fn stats(&self) -> Result<BTreeMap<String, u64>> {
        read_stats(&self.pin(pins::STATS))
    }

    /// Runs `bpftool [-j] map dump pinned <pin>` and returns its output.
    pub fn bpftool_dump(&self, map: &str, json: bool) -> Result<String> {
        let mut c = std::process::Command::new(crate::cmd::program("bpftool"));
        if json {
            c.arg("-j");
        }
        c.args(["map", "dump", "pinned"]).arg(self.pin(map));
        crate::cmd::output(&mut c)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.stop();
            if failing {
                eprintln!(
                    "lab {}: lb-agent log ({}):\n{}",
                    self.site.prefix(),
                    agent.log_path().display(),
                    agent.log()
                );
            }
        }
        self.extra_servers.clear();
        self.pods.clear();
        if failing && let Some(dir) = self.site.keep_dir() {
            eprintln!("lab {}: kept {}", self.site.prefix(), dir.display());
        }
        // client, node and the site (pins, then the temporary directory)
        // drop next, in field order.
    }
}
