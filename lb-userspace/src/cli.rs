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
    /// Attach an XDP program that passes everything to an interface, through
    /// a link pinned at --pin, and exit. For test topologies: a veth delivers
    /// the frames another node's XDP program sends with XDP_TX/XDP_REDIRECT
    /// (rejects, forwarded flows) only when the receiving end has an XDP
    /// program. Remove the pin to detach.
    XdpPass(XdpPassArgs),
}

/// Arguments of `lb-agent xdp-pass`.
#[derive(Debug, Args)]
pub struct XdpPassArgs {
    /// Interface (in the current network namespace).
    #[arg(short, long, value_name = "IFACE")]
    pub interface: String,
    /// bpffs path where the link is pinned.
    #[arg(long, value_name = "PATH")]
    pub pin: PathBuf,
}

/// Arguments of `lb-agent run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Interface that receives service traffic (repeatable). XDP is attached
    /// to its ingress and TC to its egress; NodePorts are served on every
    /// IPv4 address of these interfaces.
    #[arg(short, long = "interface", value_name = "IFACE", required = true)]
    pub interfaces: Vec<String>,

    /// Static source instead of Kubernetes: Service and EndpointSlice
    /// objects in a YAML file as printed by `kubectl get
    /// svc,endpointslices -A -o yaml`, or a directory of such files.
    /// Re-read on SIGHUP; a bad file is rejected and the last good state
    /// kept.
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

    /// bpffs directory where maps are pinned (under `v1/`). Pinned maps are
    /// reused on restart, so established flows survive it.
    #[arg(long, default_value = "/sys/fs/bpf/lb", value_name = "PATH")]
    pub bpffs_root: PathBuf,

    /// Maglev table size per service: a prime ≤ 16381. Each backend's share
    /// of new flows is within 1% of 1/N when the size is ≥ 100·N.
    #[arg(long, default_value_t = lb_common::MAGLEV_DEFAULT_SIZE, value_name = "PRIME")]
    pub maglev_table_size: u32,

    /// Conntrack capacity in entries (two per flow), used when the map is
    /// first created.
    #[arg(long, default_value_t = lb_common::CT_DEFAULT_CAPACITY, value_name = "N")]
    pub conntrack_capacity: u32,

    /// Address of the HTTP server for /metrics (Prometheus), /healthz and
    /// /readyz (ready after the first full sync). `off` disables it.
    #[arg(long, default_value = "0.0.0.0:9995", value_name = "ADDR:PORT|off")]
    pub metrics_addr: String,

    /// On SIGINT/SIGTERM leave the programs attached (their links stay
    /// pinned) so traffic keeps flowing until the next agent takes over
    /// atomically. For DaemonSet restarts; by default the agent detaches.
    #[arg(long)]
    pub keep_datapath_on_exit: bool,

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
