//! kube-proxy's dataplane programming, reproduced for the benchmark: the
//! rules kube-proxy (1.31+) writes in iptables mode and in nftables mode for a
//! set of NodePort services, the tool invocations that load them, and the same
//! services as Kubernetes objects for `lb-agent run --manifests`. One set of
//! [`BenchService`]s feeds all three, so `cargo xtask bench` compares like
//! with like.
//!
//! - [`iptables`]: the `iptables-restore` input of a full sync, and of a
//!   partial sync (`MinimizeIPTablesRestore`, on by default since 1.27) after
//!   one endpoint changed.
//! - [`nftables`]: the `nft -f` transaction of a full sync and of a partial
//!   sync, table `ip kube-proxy`.
//! - [`manifests`]: a `kind: List` of Services and EndpointSlices.
//! - [`control_plane`]: time from the objects to a
//!   programmed dataplane, and for one added endpoint.
//!
//! What kube-proxy configuration is reproduced (its defaults unless said):
//! `externalTrafficPolicy: Cluster`, no session affinity, masquerade bit 14
//! (mark `0x004000`), `--detect-local-mode=ClusterCIDR` with cluster CIDR
//! [`CLUSTER_CIDR`] (what kubeadm clusters run), service CIDR
//! [`SERVICE_CIDR`]; iptables mode: `--nodeport-addresses` unset (every local
//! address), `--iptables-localhost-nodeports=true`, no nfacct counters,
//! conntrack `tcp_be_liberal` off; nftables mode: `--nodeport-addresses`
//! defaults to `primary`, the node's address ([`NodeInfo::addr`]).
//!
//! # Rule order and the bench's target
//!
//! kube-proxy walks a Go map, so its order of services is effectively
//! random. Here every per-service rule list (iptables `KUBE-SERVICES`,
//! `KUBE-NODEPORTS`, and the nftables transaction) follows the slice order
//! **except that `svcs[0]` goes last**: `svcs[1], svcs[2], …, svcs[n-1],
//! svcs[0]`. The bench targets service 0, so in iptables mode its first
//! packet walks every other service's rule first (the worst case, which a
//! random order reaches on average halfway). nftables looks services up in
//! hash maps, where order does not matter.

pub mod control_plane;
pub mod iptables;
pub mod nftables;

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use lb_testkit::lab::netns::Netns;

pub use control_plane::control_plane;

/// The namespace of the generated services.
pub const NAMESPACE: &str = "bench";
/// The Service port (on each cluster IP).
pub const SERVICE_PORT: u16 = 80;
/// The port the endpoints listen on (`targetPort`).
pub const TARGET_PORT: u16 = 8080;
/// The first node port: service `i` gets `NODE_PORT_BASE + i` while that
/// stays within Kubernetes' default range 30000-32767 (services 0-2767).
pub const NODE_PORT_BASE: u16 = 30_000;
/// Services 2768 and later get `NODE_PORT_OVERFLOW_BASE + (i - 2768)`,
/// 20000-29999: Kubernetes would need `--service-node-port-range=20000-32767`
/// for that, and neither mode cares. Together at most [`MAX_SERVICES`].
pub const NODE_PORT_OVERFLOW_BASE: u16 = 20_000;
/// How many services [`services`] can number: 2768 + 10000.
pub const MAX_SERVICES: usize = 12_768;
/// The pod network kube-proxy's local-traffic detector knows
/// (`--cluster-cidr`, kubeadm's usual value).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The service CIDR; cluster IPs are `10.96.0.10` onwards.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// kube-proxy's masquerade mark (`1 << 14` printed with Go's `%#08x`).
pub const MASQ_MARK: &str = "0x004000";

/// L4 protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// Lower case, as kube-proxy writes it in chain names and rules.
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// As in Kubernetes objects (`TCP`).
    pub fn upper(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }

    /// The name of the one Service port: `http` for TCP, `udp` for UDP.
    pub fn port_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "http",
            Protocol::Udp => "udp",
        }
    }
}

/// One NodePort Service with one port, `externalTrafficPolicy: Cluster`, and
/// its ready endpoints (all on the node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchService {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.clusterIP`.
    pub cluster_ip: Ipv4Addr,
    /// `spec.ports[0].port`.
    pub port: u16,
    /// `spec.ports[0].nodePort`.
    pub node_port: u16,
    /// `spec.ports[0].protocol`.
    pub protocol: Protocol,
    /// `spec.ports[0].targetPort` (a number), the endpoints' port.
    pub target_port: u16,
    /// Ready endpoint addresses, in EndpointSlice order.
    pub endpoints: Vec<Ipv4Addr>,
}

impl BenchService {
    /// kube-proxy's `ServicePortName.String()`: `namespace/name:port-name`.
    pub fn port_name_string(&self) -> String {
        format!(
            "{}/{}:{}",
            self.namespace,
            self.name,
            self.protocol.port_name()
        )
    }
}

/// The node the rules are for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// `metadata.name` of the Node, the endpoints' `nodeName` and the agent's
    /// `--node-name`.
    pub name: String,
    /// The node's address: where NodePorts are served.
    pub addr: Ipv4Addr,
}

/// Which kube-proxy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// iptables mode (`iptables-restore`, whichever backend it is).
    Iptables,
    /// nftables mode (`nft -f`).
    Nftables,
}

/// `n` services `bench/svc-00000` … with `endpoints_per_service` endpoints
/// each, `endpoint(service, endpoint)` giving the addresses.
///
/// Service `i`: cluster IP `10.96.0.10 + i`, port [`SERVICE_PORT`], node
/// port `30000 + i` for `i < 2768`, else `20000 + (i - 2768)` (see
/// [`NODE_PORT_OVERFLOW_BASE`]), target port [`TARGET_PORT`]. The bench's
/// target is service 0, which every rule generator here writes **last** (see
/// the module documentation).
///
/// # Panics
/// When `n > MAX_SERVICES`.
pub fn services(
    n: usize,
    endpoints_per_service: usize,
    endpoint: impl Fn(usize, usize) -> Ipv4Addr,
    protocol: Protocol,
) -> Vec<BenchService> {
    assert!(
        n <= MAX_SERVICES,
        "at most {MAX_SERVICES} services have distinct node ports"
    );
    let first_ip = u32::from(Ipv4Addr::new(10, 96, 0, 10));
    (0..n)
        .map(|i| BenchService {
            namespace: NAMESPACE.into(),
            name: format!("svc-{i:05}"),
            cluster_ip: Ipv4Addr::from(first_ip + i as u32),
            port: SERVICE_PORT,
            node_port: node_port(i),
            protocol,
            target_port: TARGET_PORT,
            endpoints: (0..endpoints_per_service).map(|j| endpoint(i, j)).collect(),
        })
        .collect()
}

/// The node port of service `i` (see [`services`]).
pub fn node_port(i: usize) -> u16 {
    // 30000..=32767: Kubernetes' default NodePort range.
    const IN_RANGE: usize = 2768;
    if i < IN_RANGE {
        NODE_PORT_BASE + i as u16
    } else {
        NODE_PORT_OVERFLOW_BASE + (i - IN_RANGE) as u16
    }
}

/// The order rules are written in: `1, 2, …, n-1, 0` (the target last).
pub fn rule_order(n: usize) -> impl Iterator<Item = usize> {
    (1..n).chain((n > 0).then_some(0))
}

/// kube-proxy's `base32(sha256(s))`, standard alphabet, first `len` chars.
pub fn hash_prefix(s: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(s.as_bytes());
    let mut out = String::with_capacity(len);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in digest.iter() {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
            if out.len() == len {
                return out;
            }
        }
        acc &= (1 << bits) - 1;
    }
    out
}

/// `iptables-restore` input that installs kube-proxy's iptables-mode rules
/// for `svcs` on its own (nat and filter tables, with the jumps from the
/// built-in chains). See [`iptables::full_text`].
pub fn iptables_restore_text(svcs: &[BenchService], node: &NodeInfo) -> String {
    iptables::full_text(svcs, node)
}

/// `nft -f` input: kube-proxy's first full nftables-mode sync for `svcs`
/// (table `ip kube-proxy`). See [`nftables::full_text`].
pub fn nftables_text(svcs: &[BenchService], node: &NodeInfo) -> String {
    nftables::full_text(svcs, node)
}

/// Installs kube-proxy's rules for `svcs` into `ns` with one
/// `iptables-restore` or one `nft -f` (input on stdin, as kube-proxy feeds
/// it), and returns the wall time of that one tool run. Replaces what the
/// same mode installed before (iptables: the nat and filter tables; nftables:
/// the table `ip kube-proxy`).
pub fn install(ns: &Netns, mode: Mode, svcs: &[BenchService], node: &NodeInfo) -> Result<Duration> {
    match mode {
        Mode::Iptables => iptables::install(ns, iptables::RESTORE, svcs, node),
        Mode::Nftables => {
            flush(ns, Mode::Nftables)?;
            run_tool(ns, "nft", &["-f", "-"], &nftables::full_text(svcs, node))
        }
    }
}

/// What kube-proxy does when endpoint `addr` is added to `svcs[idx]` after
/// a full sync: pushes it onto `svcs[idx].endpoints` and runs the partial
/// sync kube-proxy would (iptables: one `iptables-restore --noflush` with
/// every top-level chain and only the changed service's chains; nftables:
/// one `nft -f` transaction rewriting the changed service's chains). Returns
/// the wall time of the tool run.
pub fn add_endpoint(
    ns: &Netns,
    mode: Mode,
    svcs: &mut [BenchService],
    idx: usize,
    addr: Ipv4Addr,
    _node: &NodeInfo,
) -> Result<Duration> {
    let Some(svc) = svcs.get_mut(idx) else {
        bail!("no service #{idx} (have {})", svcs.len());
    };
    svc.endpoints.push(addr);
    match mode {
        Mode::Iptables => iptables::add_endpoint(ns, iptables::RESTORE, svcs, idx),
        Mode::Nftables => run_tool(
            ns,
            "nft",
            &["-f", "-"],
            &nftables::partial_text(svcs, &[idx]),
        ),
    }
}

/// Removes what [`install`] put in `ns` for `mode` (iptables: empties the nat
/// and filter tables; nftables: deletes the table `ip kube-proxy`).
pub fn flush(ns: &Netns, mode: Mode) -> Result<()> {
    match mode {
        Mode::Iptables => iptables::flush(ns, iptables::RESTORE),
        Mode::Nftables => run_tool(ns, "nft", &["-f", "-"], nftables::DELETE_TABLE).map(drop),
    }
}

/// Runs `program args` in `ns` with `input` on stdin and returns how long it
/// ran (spawn to exit, including feeding stdin); fails with its stderr.
pub fn run_tool(ns: &Netns, program: &str, args: &[&str], input: &str) -> Result<Duration> {
    let mut command = ns.command(program);
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let line = lb_testkit::cmd::display(&command);
    timed(command, input).with_context(|| format!("`{line}` in {}", ns.name()))
}

fn timed(mut command: Command, input: &str) -> Result<Duration> {
    let start = Instant::now();
    let mut child = command.spawn().context("spawn")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    // Write from a thread so that a tool that prints a lot before reading
    // everything cannot deadlock us.
    let output = std::thread::scope(|s| {
        let writer = s.spawn(move || stdin.write_all(input.as_bytes()));
        let out = child.wait_with_output();
        (writer.join(), out)
    });
    let elapsed = start.elapsed();
    let (written, out) = output;
    let out = out.context("wait")?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr: String = stderr.chars().take(4000).collect();
        bail!("failed ({}): {}", out.status, stderr.trim());
    }
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("writing stdin: {e}"),
        Err(_) => bail!("stdin writer panicked"),
    }
    Ok(elapsed)
}

/// Endpoints per EndpointSlice, as the EndpointSlice controller's default
/// `--max-endpoints-per-slice`.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// The same services as Kubernetes objects, for `lb-agent run --manifests`:
/// a `kind: List` (compact JSON, which is YAML 1.2) with, per service, a
/// `type: NodePort` Service (one port named [`Protocol::port_name`]) and
/// EndpointSlices of at most [`MAX_ENDPOINTS_PER_SLICE`] ready endpoints on
/// `node.name`, named `<service>-<k>`.
pub fn manifests(svcs: &[BenchService], node: &NodeInfo) -> String {
    let mut items = Vec::with_capacity(svcs.len() * 2);
    for svc in svcs {
        items.push(service_object(svc));
        items.extend(slice_objects(svc, node));
    }
    let list = json!({
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {"resourceVersion": ""},
        "items": items,
    });
    let mut s = list.to_string();
    s.push('\n');
    s
}

fn service_object(svc: &BenchService) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": svc.name, "namespace": svc.namespace},
        "spec": {
            "type": "NodePort",
            "clusterIP": svc.cluster_ip.to_string(),
            "clusterIPs": [svc.cluster_ip.to_string()],
            "ipFamilies": ["IPv4"],
            "ports": [{
                "name": svc.protocol.port_name(),
                "protocol": svc.protocol.upper(),
                "port": svc.port,
                "nodePort": svc.node_port,
                "targetPort": svc.target_port,
            }],
        },
    })
}

fn slice_objects(svc: &BenchService, node: &NodeInfo) -> Vec<Value> {
    let chunks: Vec<&[Ipv4Addr]> = if svc.endpoints.is_empty() {
        vec![&[]]
    } else {
        svc.endpoints.chunks(MAX_ENDPOINTS_PER_SLICE).collect()
    };
    chunks
        .into_iter()
        .enumerate()
        .map(|(k, chunk)| {
            let endpoints: Vec<Value> = chunk
                .iter()
                .map(|a| {
                    json!({
                        "addresses": [a.to_string()],
                        "conditions": {"ready": true, "serving": true, "terminating": false},
                        "nodeName": node.name,
                    })
                })
                .collect();
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("{}-{k}", svc.name),
                    "namespace": svc.namespace,
                    "labels": {
                        "kubernetes.io/service-name": svc.name,
                        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    },
                },
                "addressType": "IPv4",
                "ports": [{
                    "name": svc.protocol.port_name(),
                    "protocol": svc.protocol.upper(),
                    "port": svc.target_port,
                }],
                "endpoints": endpoints,
            })
        })
        .collect()
}

/// Writes [`manifests`] to `path`.
pub fn write_manifests(path: &Path, svcs: &[BenchService], node: &NodeInfo) -> Result<()> {
    std::fs::write(path, manifests(svcs, node)).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(i: usize, j: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 16 + i as u8, 10 + j as u8)
    }

    #[test]
    fn services_are_numbered_and_distinct() {
        let svcs = services(MAX_SERVICES, 2, |_, _| Ipv4Addr::LOCALHOST, Protocol::Tcp);
        assert_eq!(svcs[0].name, "svc-00000");
        assert_eq!(svcs[0].cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(svcs[0].node_port, 30_000);
        assert_eq!(svcs[2767].node_port, 32_767);
        assert_eq!(svcs[2768].node_port, 20_000);
        assert_eq!(svcs[MAX_SERVICES - 1].node_port, 29_999);
        let ports: std::collections::BTreeSet<u16> = svcs.iter().map(|s| s.node_port).collect();
        let ips: std::collections::BTreeSet<Ipv4Addr> = svcs.iter().map(|s| s.cluster_ip).collect();
        assert_eq!(ports.len(), MAX_SERVICES);
        assert_eq!(ips.len(), MAX_SERVICES);
        assert!(!ports.contains(&TARGET_PORT));
        assert!(svcs.iter().all(|s| s.endpoints.len() == 2));
    }

    #[test]
    fn target_goes_last() {
        assert_eq!(rule_order(4).collect::<Vec<_>>(), [1, 2, 3, 0]);
        assert_eq!(rule_order(1).collect::<Vec<_>>(), [0]);
        assert_eq!(rule_order(0).count(), 0);
    }

    #[test]
    fn hash_is_base32_of_sha256() {
        // base32("sha256 of the empty string" = e3b0c442 98fc1c14 …).
        assert_eq!(hash_prefix("", 16), "4OYMIQUY7QOBJGX3");
        let a = hash_prefix("bench/svc-00000:httptcp", 16);
        assert_eq!(a, hash_prefix("bench/svc-00000:httptcp", 16));
        assert_eq!(a.len(), 16);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        );
        assert_ne!(a, hash_prefix("bench/svc-00001:httptcp", 16));
    }

    /// Chain names that appear in kube-proxy's own tests and comments
    /// (service `ns1/svc1`, port `p80`, endpoint `10.180.0.1:80`), from the
    /// strings kube-proxy hashes.
    #[test]
    fn hashes_match_kube_proxys_names() {
        // iptables: KUBE-SVC-XPGD46QRK7WJZT7O, KUBE-SEP-SXIVWICOYRO3J4NJ.
        assert_eq!(hash_prefix("ns1/svc1:p80tcp", 16), "XPGD46QRK7WJZT7O");
        assert_eq!(
            hash_prefix("ns1/svc1:p80tcp10.180.0.1:80", 16),
            "SXIVWICOYRO3J4NJ"
        );
        // nftables: service-ULMVA6XW-ns1/svc1/tcp/p80,
        // endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80.
        assert_eq!(hash_prefix("ns1/svc1/tcp/p80", 8), "ULMVA6XW");
        assert_eq!(
            hash_prefix("ns1/svc1/tcp/p80__10.180.0.1/80", 8),
            "5OJB2KTY"
        );
    }

    #[test]
    fn manifests_parse_with_the_right_counts() {
        let node = NodeInfo {
            name: "node-a".into(),
            addr: Ipv4Addr::new(198, 18, 0, 1),
        };
        let svcs = services(3, 150, ep_wide, Protocol::Tcp);
        let v: Value = serde_json::from_str(&manifests(&svcs, &node)).unwrap();
        assert_eq!(v["kind"], "List");
        let items = v["items"].as_array().unwrap();
        let kinds = |k: &str| items.iter().filter(|i| i["kind"] == k).count();
        assert_eq!(kinds("Service"), 3);
        assert_eq!(kinds("EndpointSlice"), 6, "150 endpoints → 2 slices each");
        let eps: usize = items
            .iter()
            .filter(|i| i["kind"] == "EndpointSlice")
            .map(|i| i["endpoints"].as_array().unwrap().len())
            .sum();
        assert_eq!(eps, 450);
        let svc = &items[0];
        assert_eq!(svc["spec"]["type"], "NodePort");
        assert_eq!(svc["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(svc["spec"]["ports"][0]["nodePort"], 30_000);
        assert_eq!(svc["spec"]["ports"][0]["name"], "http");
        let slice = &items[1];
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "svc-00000"
        );
        assert_eq!(slice["ports"][0]["name"], "http");
        assert_eq!(slice["ports"][0]["port"], 8080);
        assert_eq!(slice["endpoints"][0]["nodeName"], "node-a");
        assert_eq!(slice["endpoints"][0]["conditions"]["ready"], true);

        let small = services(2, 3, ep, Protocol::Udp);
        let v: Value = serde_json::from_str(&manifests(&small, &node)).unwrap();
        assert_eq!(v["items"].as_array().unwrap().len(), 4);
        assert_eq!(v["items"][0]["spec"]["ports"][0]["protocol"], "UDP");
    }

    fn ep_wide(i: usize, j: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 0)) + (i * 1000 + j) as u32)
    }
}
