//! Command line of `lb-agent`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// lb-agent: XDP/eBPF load balancer for Kubernetes NodePort and LoadBalancer
/// services. Loads the datapath, pins its maps and keeps them equal to the
/// services it is given.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load and attach the datapath, fill its maps from the manifests or from
    /// the Kubernetes API, and keep them current until SIGINT/SIGTERM
    /// (SIGHUP re-reads the manifests).
    Run(RunArgs),
    /// List the flows open on this node, read from the pinned maps (works
    /// while the agent is down): client, frontend, backend, service,
    /// protocol, TCP state, age, idle time, and why that backend.
    Flows(FlowsArgs),
    /// List the backends of this node's services with their state (ready,
    /// serving, terminating, removed), open flows, packets and bytes.
    Backends(BackendsArgs),
    /// List the interfaces the datapath is attached to and the hook that
    /// runs its ingress logic on each (xdp or tc), from the pinned links.
    Interfaces(InterfacesArgs),
}

/// Arguments of `lb-agent interfaces`.
#[derive(Debug, Args)]
pub struct InterfacesArgs {
    /// bpffs directory where the agent pins its maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/lb", value_name = "PATH")]
    pub bpffs_root: PathBuf,
}

/// Arguments of `lb-agent flows`.
#[derive(Debug, Args)]
pub struct FlowsArgs {
    /// bpffs directory where the agent pins its maps.
    #[arg(long, default_value = "/sys/fs/bpf/lb", value_name = "PATH")]
    pub bpffs_root: PathBuf,
    /// Only flows of this service: NS/NAME (every port) or NS/NAME:PORT.
    #[arg(long, value_name = "NS/NAME")]
    pub service: Option<String>,
    /// Only flows to this backend: IP or IP:PORT.
    #[arg(long, value_name = "IP")]
    pub backend: Option<String>,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `lb-agent backends`.
#[derive(Debug, Args)]
pub struct BackendsArgs {
    /// bpffs directory where the agent pins its maps.
    #[arg(long, default_value = "/sys/fs/bpf/lb", value_name = "PATH")]
    pub bpffs_root: PathBuf,
    /// Only backends of this service: NS/NAME (every port) or NS/NAME:PORT.
    #[arg(long, value_name = "NS/NAME")]
    pub service: Option<String>,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `lb-agent run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Interface that receives service traffic (repeatable). The ingress
    /// logic is attached at XDP or TC ingress (`--attach`), the reply path
    /// at TC egress; NodePorts are served on every
    /// IPv4 address of these interfaces.
    #[arg(short, long = "interface", value_name = "IFACE", required = true)]
    pub interfaces: Vec<String>,

    /// Where the ingress logic runs: `auto` (native XDP where the driver
    /// has it, TC ingress on veth and other virtual devices, never generic
    /// XDP), `xdp` (native XDP or an error) or `tc` (TC ingress).
    #[arg(long, value_enum, default_value_t = crate::loader::AttachMode::Auto)]
    pub attach: crate::loader::AttachMode,

    /// Static source instead of Kubernetes: Service and EndpointSlice
    /// objects in a YAML file as printed by `kubectl get
    /// svc,endpointslices -A -o yaml`, or a directory of such files.
    /// Re-read on SIGHUP; a file that does not parse is rejected and the
    /// last good state kept; objects that parse but cannot be balanced are
    /// left out and reported (/skipped), and the others synced.
    #[arg(short, long, value_name = "FILE_OR_DIR")]
    pub manifests: Option<PathBuf>,

    /// Kubernetes source: kubeconfig file. Without it (and without
    /// --manifests) the in-cluster configuration is used, then
    /// KUBECONFIG / ~/.kube/config.
    #[arg(long, value_name = "FILE", conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,

    /// This node's name (default: $NODE_NAME): endpoints whose `nodeName`
    /// differs are remote (not served yet; logged once); the Node object of
    /// this name is watched.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: String,

    /// bpffs directory where maps are pinned (under `v4/`). Pinned maps are
    /// reused on restart, so established flows survive it.
    #[arg(long, default_value = "/sys/fs/bpf/lb", value_name = "PATH")]
    pub bpffs_root: PathBuf,

    /// One Maglev table size for every service: a prime ≤ 16381. By
    /// default each service's table takes the smallest of 1021, 4093 and
    /// 16381 slots that is at least 100 × its backends (each backend's share
    /// of new flows within about 1% of 1/N), so memory follows the service.
    #[arg(long, value_name = "PRIME")]
    pub maglev_table_size: Option<u32>,

    /// Conntrack capacity in entries (two per flow), used when the map is
    /// first created.
    #[arg(long, default_value_t = lb_common::CT_DEFAULT_CAPACITY, value_name = "N")]
    pub conntrack_capacity: u32,

    /// Address of the HTTP server for /metrics (Prometheus), /healthz,
    /// /readyz (ready after the first full sync) and /skipped (objects left
    /// out, as JSON). `off` disables it. /metrics and /skipped name
    /// services and pod addresses: bind to 127.0.0.1 or a node-internal
    /// address unless the port is firewalled.
    #[arg(long, default_value = "0.0.0.0:9995", value_name = "ADDR:PORT|off")]
    pub metrics_addr: String,

    /// Accept `spec.externalIPs` entries that are addresses of this node.
    /// By default they are refused (and reported, reason
    /// `external_ip_is_node_address`): any user who can create a Service
    /// could otherwise capture traffic meant for the node itself (its
    /// NodePorts, the kubelet, sshd) — CVE-2020-8554.
    #[arg(long)]
    pub allow_external_ip_node_address: bool,

    /// On SIGINT/SIGTERM leave the programs attached (their links stay
    /// pinned) so traffic keeps flowing until the next agent takes over
    /// atomically. For DaemonSet restarts; by default the agent detaches.
    #[arg(long)]
    pub keep_datapath_on_exit: bool,

    /// Source ports for flows forwarded to pods on other nodes (SNAT), as
    /// LO-HI. Keep the range clear of the NodePort range and of the
    /// kernel's ip_local_port_range. A backend serves at most this many
    /// forwarded flows at once; beyond that new ones are dropped and counted.
    #[arg(long, default_value = "61000-65535", value_parser = parse_port_range, value_name = "LO-HI")]
    pub snat_port_range: (u16, u16),

    /// Source address of forwarded flows (default: the first IPv4 address of
    /// the first --interface). Replies must route back to it.
    #[arg(long, value_name = "IPV4")]
    pub snat_address: Option<std::net::Ipv4Addr>,

    /// A UDP flow idle this many seconds is over (its conntrack and NAT
    /// entries are removed).
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub nat_udp_timeout: u64,

    /// A TCP flow idle this many seconds is over.
    #[arg(long, default_value_t = 7200, value_name = "SECS")]
    pub nat_tcp_idle_timeout: u64,

    /// A closed TCP flow (RST, or FIN both ways) is removed this many
    /// seconds after its last packet.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub nat_tcp_closed_grace: u64,

    /// A TCP flow whose client never completed the handshake (only SYNs
    /// seen from it) is removed this many seconds after the client's last
    /// packet, releasing its conntrack entries and SNAT port (netfilter
    /// keeps SYN_SENT for 120 s).
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub nat_tcp_syn_timeout: u64,

    /// Seconds between garbage collections of the conntrack and NAT tables.
    #[arg(long, default_value_t = 5, value_name = "SECS")]
    pub gc_interval: u64,

    /// Seconds between full resyncs: every object translated and every map
    /// entry planned again, as a safety net under the per-change syncs
    /// (which translate and plan only the Services that changed). 0: never.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub full_resync_interval: u64,

    /// Log filter (RUST_LOG syntax), e.g. `info` or `lb_userspace=debug`.
    #[arg(long, env = "LB_LOG", default_value = "info")]
    pub log_level: String,

    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Log output format.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses `LO-HI` (inclusive, LO ≤ HI, both ≥ 1).
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected LO-HI, e.g. 61000-65535"))?;
    let lo: u16 = lo.trim().parse().map_err(|e| format!("{lo:?}: {e}"))?;
    let hi: u16 = hi.trim().parse().map_err(|e| format!("{hi:?}: {e}"))?;
    if lo == 0 || lo > hi {
        return Err(format!("{s:?}: need 1 ≤ LO ≤ HI"));
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("61000-65535"), Ok((61000, 65535)));
        assert_eq!(parse_port_range("5-5"), Ok((5, 5)));
        assert!(parse_port_range("10-5").is_err());
        assert!(parse_port_range("0-5").is_err());
        assert!(parse_port_range("61000").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
