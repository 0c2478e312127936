//! Building network-namespace topologies: the one builder behind the
//! single-node lab ([`crate::lab::Lab`]), the two-node lab
//! ([`crate::lab::cluster::ClusterLab`]) and the traffic bench's topology.
//!
//! - [`preflight`]: root and the tools every topology runs;
//! - [`Site`]: a topology's unique name prefix, its temporary directory and
//!   its bpffs directory, and its namespaces named after the prefix;
//! - [`Wiring`]: the `ip` commands topologies are made of (veth pairs,
//!   addresses, bridges, routes), run one at a time in a namespace
//!   ([`Netns`]) or queued for one `ip -batch` ([`Batch`]);
//! - [`plug_into_bridge`]: a pod's namespace on a node's bridge;
//! - on [`Netns`] itself: transmit checksum offload off, sysctls, `ip -batch`.

use std::{
    cell::RefCell,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::{self, BPFFS, Netns};

/// The tools a topology runs: `ip`, `ethtool` (offloads), `nsenter`
/// ([`Netns::command`]) and `sysctl`.
pub const TOOLS: [&str; 4] = ["ip", "ethtool", "nsenter", "sysctl"];

/// Fails unless this process is root and every one of [`TOOLS`] is found;
/// `who` names the topology in the error (`"the lab"`).
pub fn preflight(who: &str) -> Result<()> {
    if !crate::is_root() {
        bail!("{who} needs root (network namespaces, BPF)");
    }
    for tool in TOOLS {
        if crate::cmd::find_program(tool).is_none() {
            bail!("`{tool}` not found: run `cargo xtask setup`");
        }
    }
    Ok(())
}

/// Numbers the sites of this process.
static COUNTER: AtomicU32 = AtomicU32::new(1);

/// Where one topology lives: its unique prefix `lbt-<pid>-<tag><n>` (the
/// pid, so that runs at the same time do not collide and
/// [`netns::remove_stale`] can tell leftovers of crashed runs; `n`
/// counts the sites of this process), a temporary directory named after it
/// (manifests, logs) and its bpffs directory `/sys/fs/bpf/<prefix>`
/// (created only by [`Site::create_pins`]; an agent creates its own). The
/// drop removes the bpffs directory, then the temporary directory.
#[derive(Debug)]
pub struct Site {
    prefix: String,
    pins: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl Site {
    /// A new site; `tag` tells kinds of topology apart in the names (`""`
    /// for the labs, `"t"` for the traffic bench).
    pub fn new(tag: &str) -> Result<Self> {
        let prefix = format!(
            "{}{}-{tag}{}",
            netns::PREFIX,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()
            .context("create temp dir")?;
        Ok(Self {
            pins: Path::new(BPFFS).join(&prefix),
            prefix,
            dir: Some(dir),
        })
    }

    /// The unique prefix of the site's names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Creates the namespace `<prefix>-<role>`.
    pub fn netns(&self, role: &str) -> Result<Netns> {
        Netns::create(format!("{}-{role}", self.prefix))
    }

    /// The temporary directory (`/tmp` once [`Site::keep_dir`] took it).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new("/tmp"), |d| d.path())
    }

    /// Keeps the temporary directory past the drop (a failing test's logs)
    /// and returns its path; `None` if it was kept already.
    pub fn keep_dir(&mut self) -> Option<PathBuf> {
        self.dir.take().map(tempfile::TempDir::keep)
    }

    /// The bpffs directory `/sys/fs/bpf/<prefix>`.
    pub fn pins(&self) -> &Path {
        &self.pins
    }

    /// Creates the bpffs directory (and returns it).
    pub fn create_pins(&self) -> Result<&Path> {
        std::fs::create_dir_all(&self.pins)
            .with_context(|| format!("create {}", self.pins.display()))?;
        Ok(&self.pins)
    }

    /// Removes the bpffs directory now, if it exists (the drop does it
    /// otherwise).
    pub fn remove_pins(&self) -> Result<()> {
        if self.pins.exists() {
            std::fs::remove_dir_all(&self.pins)
                .with_context(|| format!("remove {}", self.pins.display()))?;
        }
        Ok(())
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Err(e) = self.remove_pins() {
            eprintln!("lab: cleanup: {e:#}");
        }
    }
}

/// The `ip` commands topologies are made of, written once for both ways of
/// running them: one `ip` process per command in a namespace ([`Netns`]; an
/// error names its command), or queued for one `ip -batch` ([`Batch`]; a
/// few processes instead of dozens). Each helper is the exact command
/// sequence it documents.
pub trait Wiring {
    /// Runs, or queues, `ip ARGS` in the namespace.
    fn ip(&self, args: &[&str]) -> Result<()>;

    /// A veth pair: `iface` here, its peer `peer_iface` in `peer`
    /// (`link add IFACE type veth peer name PEER_IFACE netns PEER`).
    fn veth(&self, iface: &str, peer: &Netns, peer_iface: &str) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            iface,
            "type",
            "veth",
            "peer",
            "name",
            peer_iface,
            "netns",
            peer.name(),
        ])
    }

    /// Sets `iface` up.
    fn up(&self, iface: &str) -> Result<()> {
        self.ip(&["link", "set", iface, "up"])
    }

    /// Adds `addr/len` to `iface`, then sets it up.
    fn addr_up(&self, iface: &str, addr: Ipv4Addr, len: u8) -> Result<()> {
        self.ip(&["addr", "add", &format!("{addr}/{len}"), "dev", iface])?;
        self.up(iface)
    }

    /// A bridge `name`, with the MAC address `mac` and the address `addr`
    /// when given, then up. A bridge without a fixed MAC address takes the
    /// lowest one of its ports, so it changes as ports come and go.
    fn bridge(&self, name: &str, mac: Option<&str>, addr: Option<(Ipv4Addr, u8)>) -> Result<()> {
        self.ip(&["link", "add", name, "type", "bridge"])?;
        if let Some(mac) = mac {
            self.ip(&["link", "set", name, "address", mac])?;
        }
        if let Some((addr, len)) = addr {
            self.ip(&["addr", "add", &format!("{addr}/{len}"), "dev", name])?;
        }
        self.up(name)
    }

    /// Makes `port` a port of `bridge`, then sets it up.
    fn enslave(&self, port: &str, bridge: &str) -> Result<()> {
        self.ip(&["link", "set", port, "master", bridge])?;
        self.up(port)
    }

    /// `route add DEST via GATEWAY` (`dest`: a prefix or `default`).
    fn route(&self, dest: &str, via: Ipv4Addr) -> Result<()> {
        self.ip(&["route", "add", dest, "via", &via.to_string()])
    }
}

impl Wiring for Netns {
    fn ip(&self, args: &[&str]) -> Result<()> {
        // The inherent method: `ip -n <ns> ARGS`, now.
        Netns::ip(self, args)
    }
}

/// `ip` commands for one namespace, queued and then run by one
/// `ip -n <ns> -batch -` ([`Batch::run`]). Arguments are joined with
/// spaces, so none may contain whitespace.
#[derive(Debug)]
pub struct Batch<'a> {
    ns: &'a Netns,
    lines: RefCell<Vec<String>>,
}

impl<'a> Batch<'a> {
    /// An empty batch for `ns`.
    pub fn new(ns: &'a Netns) -> Self {
        Self {
            ns,
            lines: RefCell::new(Vec::new()),
        }
    }

    /// Runs the queued commands ([`Netns::ip_batch`]).
    pub fn run(self) -> Result<()> {
        self.ns.ip_batch(&self.lines.into_inner())
    }
}

impl Wiring for Batch<'_> {
    fn ip(&self, args: &[&str]) -> Result<()> {
        if let Some(arg) = args.iter().find(|a| a.contains(char::is_whitespace)) {
            bail!("`ip -batch` argument {arg:?} contains whitespace");
        }
        self.lines.borrow_mut().push(args.join(" "));
        Ok(())
    }
}

/// Plugs the namespace `pod` into `bridge` of `node`: a veth `port` in
/// `node` (a port of the bridge, up) to `eth0` in `pod`, which gets
/// `addr/len`, is set up, and has its default route via `gateway` (the
/// bridge's address).
pub fn plug_into_bridge(
    node: &Netns,
    bridge: &str,
    port: &str,
    pod: &Netns,
    (addr, len): (Ipv4Addr, u8),
    gateway: Ipv4Addr,
) -> Result<()> {
    node.veth(port, pod, "eth0")?;
    node.enslave(port, bridge)?;
    pod.addr_up("eth0", addr, len)?;
    pod.route("default", gateway)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_names() {
        let pid = std::process::id();
        let (lab, bench) = (Site::new("").unwrap(), Site::new("t").unwrap());
        let n = |site: &Site, head: &str| -> u32 {
            site.prefix().strip_prefix(head).unwrap().parse().unwrap()
        };
        let (a, b) = (
            n(&lab, &format!("lbt-{pid}-")),
            n(&bench, &format!("lbt-{pid}-t")),
        );
        assert_ne!(a, b, "one counter for every kind of site");
        assert_eq!(lab.pins(), Path::new("/sys/fs/bpf").join(lab.prefix()));
        let dir = lab
            .dir()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(dir.starts_with(&format!("{}-", lab.prefix())), "{dir}");
    }
}
