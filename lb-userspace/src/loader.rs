//! Loads the embedded eBPF object, pins its maps (reusing pins left by a
//! previous run, so conntrack and counters survive a restart), and attaches
//! the programs to the node's interfaces: the ingress logic at XDP or at TC
//! ingress ([`AttachMode`]), the reply path at TC egress.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use lb_common::{PIN_DIR, pin};
use tracing::{info, warn};

use crate::error::{Error, Result};

/// The compiled datapath (`lb-ebpf`), built by `build.rs` with BTF.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Name of the XDP program in the object.
pub const XDP_PROGRAM: &str = "lb_xdp";
/// Name of the TC ingress program in the object (the same logic as
/// [`XDP_PROGRAM`], for devices where XDP does not fit).
pub const TC_INGRESS_PROGRAM: &str = "lb_tc_ingress";
/// Name of the TC egress program in the object.
pub const TC_PROGRAM: &str = "lb_tc_egress";
/// Name of the program that ends one flow's open-flow count (run by the
/// collector through BPF_PROG_TEST_RUN, never attached).
pub const FLOW_END_PROGRAM: &str = "lb_flow_end";

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How to load the datapath.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Root under which maps are pinned (`<root>/v<MAP_VERSION>/<MAP>`).
    pub bpffs_root: PathBuf,
    /// Conntrack entries (two per flow). Only applies when the map is created;
    /// a pinned map keeps its size. The open-flow registry gets half of it.
    pub ct_capacity: u32,
}

/// The loader for the object with every map pinned under `opts`' root
/// (created, or reused when a pin exists).
fn pinned_loader(opts: &LoadOptions, dir: &Path) -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    for name in pin::ALL {
        let path = dir.join(name);
        if path.exists() {
            info!(map = name, path = %path.display(), "reusing pinned map");
        }
        loader.map_pin_path(name, path);
    }
    loader.map_max_entries(pin::CONNTRACK_V4, opts.ct_capacity);
    loader.map_max_entries(pin::OPEN_FLOWS_V4, (opts.ct_capacity / 2).max(1));
    loader
}

/// The loaded datapath: programs, maps and the interfaces it is attached to.
pub struct Datapath {
    /// The aya object (programs and maps).
    pub ebpf: Ebpf,
    /// Directory holding the map pins.
    pub pin_dir: PathBuf,
    /// Directory holding the link pins (`<bpffs-root>/links`).
    pub link_dir: PathBuf,
    attached: Vec<Attached>,
}

/// The two links of one interface, pinned so that they outlive the agent.
struct Attached {
    iface: String,
    ingress: (PathBuf, PinnedLink),
    tc: (PathBuf, PinnedLink),
}

/// Where the ingress logic runs on an interface (`--attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Native XDP on a device whose driver has it; TC ingress on veth and
    /// other virtual devices (no `device` in sysfs), and on a NIC whose
    /// driver refuses native XDP. Never generic XDP.
    #[default]
    Auto,
    /// Native XDP only: an error if the driver does not have it.
    Xdp,
    /// TC ingress.
    Tc,
}

/// The hook that runs the ingress logic on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum IngressHook {
    /// Native XDP.
    Xdp,
    /// TC ingress.
    Tc,
}

impl IngressHook {
    /// `xdp` or `tc` (logs, metrics, `lb-agent interfaces`).
    pub fn name(self) -> &'static str {
        match self {
            IngressHook::Xdp => "xdp",
            IngressHook::Tc => "tc",
        }
    }

    /// The name of its pinned link for `iface` under `<bpffs-root>/links`.
    pub fn link_name(self, iface: &str) -> String {
        match self {
            IngressHook::Xdp => format!("xdp-{iface}"),
            IngressHook::Tc => format!("tc-ingress-{iface}"),
        }
    }

    fn other(self) -> Self {
        match self {
            IngressHook::Xdp => IngressHook::Tc,
            IngressHook::Tc => IngressHook::Xdp,
        }
    }
}

/// The pinned egress link of `iface`.
fn egress_link_name(iface: &str) -> String {
    format!("tc-egress-{iface}")
}

/// The interfaces with programs attached, from the links pinned under
/// `link_dir`: (interface, ingress hook), sorted.
pub fn attached_interfaces(link_dir: &Path) -> Result<Vec<(String, IngressHook)>> {
    let entries = fs::read_dir(link_dir).map_err(|source| Error::Io {
        path: link_dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(i) = name.strip_prefix("xdp-") {
            out.push((i.to_owned(), IngressHook::Xdp));
        } else if let Some(i) = name.strip_prefix("tc-ingress-") {
            out.push((i.to_owned(), IngressHook::Tc));
        }
    }
    out.sort();
    Ok(out)
}

/// A device without a `device` link in sysfs is virtual (veth, bridge,
/// vxlan, dummy, …): its XDP runs on skbs converted to XDP buffers, and
/// its peers may not take `XDP_TX` frames.
fn is_virtual(iface: &str) -> bool {
    !Path::new("/sys/class/net")
        .join(iface)
        .join("device")
        .exists()
}

/// The directory where links are pinned (they outlive the agent).
pub fn link_dir(bpffs_root: &Path) -> PathBuf {
    bpffs_root.join("links")
}

/// The directory where maps of this layout version are pinned.
pub fn pin_dir(bpffs_root: &Path) -> PathBuf {
    bpffs_root.join(PIN_DIR)
}

fn check_bpffs(dir: &Path) -> Result<()> {
    let st = nix::sys::statfs::statfs(dir)
        .map_err(|e| Error::Datapath(format!("cannot stat {}: {e}", dir.display())))?;
    if st.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(Error::Datapath(format!(
            "{} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`",
            dir.display()
        )));
    }
    Ok(())
}

impl Datapath {
    /// Loads the object, creating or reusing the pinned maps, and loads the
    /// programs into the kernel (not attached yet).
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let dir = pin_dir(&opts.bpffs_root);
        fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        check_bpffs(&dir)?;
        let mut ebpf = pinned_loader(opts, &dir)
            .load(EBPF_OBJECT)
            .map_err(|e| Error::Datapath(format!("loading the eBPF object: {e}")))?;

        // The ingress programs are loaded when an interface needs one
        // (`load_ingress`): the verifier takes most of a second on each.
        let tc: &mut SchedClassifier = program(&mut ebpf, TC_PROGRAM)?;
        tc.load()
            .map_err(|e| Error::Datapath(format!("verifier rejected {TC_PROGRAM}: {e}")))?;
        let end: &mut Xdp = program(&mut ebpf, FLOW_END_PROGRAM)?;
        end.load()
            .map_err(|e| Error::Datapath(format!("verifier rejected {FLOW_END_PROGRAM}: {e}")))?;
        let link_dir = link_dir(&opts.bpffs_root);
        fs::create_dir_all(&link_dir).map_err(|source| Error::Io {
            path: link_dir.clone(),
            source,
        })?;
        Ok(Self {
            ebpf,
            pin_dir: dir,
            link_dir,
            attached: Vec::new(),
        })
    }

    /// Loads the program of `hook` into the kernel, unless it already is.
    pub fn load_ingress(&mut self, hook: IngressHook) -> Result<()> {
        let rejected = |name: &str, e: &dyn std::fmt::Display| {
            Error::Datapath(format!("verifier rejected {name}: {e}"))
        };
        match hook {
            IngressHook::Xdp => {
                let p: &mut Xdp = program(&mut self.ebpf, XDP_PROGRAM)?;
                if p.fd().is_err() {
                    p.load().map_err(|e| rejected(XDP_PROGRAM, &e))?;
                }
            }
            IngressHook::Tc => {
                let p: &mut SchedClassifier = program(&mut self.ebpf, TC_INGRESS_PROGRAM)?;
                if p.fd().is_err() {
                    p.load().map_err(|e| rejected(TC_INGRESS_PROGRAM, &e))?;
                }
            }
        }
        Ok(())
    }

    /// Attaches the ingress logic to `iface` at the hook `mode` selects,
    /// and TC egress, through links pinned under `<bpffs-root>/links/`. If
    /// a previous agent left pinned links there, their programs are
    /// replaced atomically (`bpf_link_update`): traffic never sees the
    /// interface without a program, so a restart keeps every flow. A link
    /// of the other ingress hook (a previous agent's choice) is removed once
    /// the new one is in place. Returns the hook in use.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<IngressHook> {
        let hook = match mode {
            AttachMode::Xdp => IngressHook::Xdp,
            AttachMode::Tc => IngressHook::Tc,
            AttachMode::Auto if is_virtual(iface) => IngressHook::Tc,
            AttachMode::Auto => IngressHook::Xdp,
        };
        let (hook, ingress) = match self.attach_ingress(iface, hook) {
            Ok(link) => (hook, link),
            Err(e) if mode == AttachMode::Auto && hook == IngressHook::Xdp => {
                warn!(iface, error = %e, "no native XDP on this device: using TC ingress");
                let link = self.attach_ingress(iface, IngressHook::Tc)?;
                (IngressHook::Tc, link)
            }
            Err(e) => return Err(e),
        };
        let tc = self.attach_egress(iface)?;
        let stale = self.link_dir.join(hook.other().link_name(iface));
        if let Ok(old) = PinnedLink::from_pin(&stale)
            && let Err(e) = old.unpin()
        {
            warn!(iface, path = %stale.display(), error = %e, "removing the other hook's link");
        }

        // A forwarded packet the datapath cannot send itself (XDP: next hop
        // not resolved yet; either hook: no route, too large) is handed to
        // the kernel already SNAT'd to this node's address; the kernel must
        // accept a local source on this interface to forward it.
        let sysctl = format!("/proc/sys/net/ipv4/conf/{iface}/accept_local");
        if let Err(e) = fs::write(&sysctl, "1") {
            warn!(iface, error = %e, "cannot set accept_local; forwarded packets the kernel must route may be lost");
        }
        info!(
            iface,
            ingress = hook.name(),
            "attached {} ingress and TC egress",
            hook.name().to_uppercase()
        );
        self.attached.push(Attached {
            iface: iface.to_string(),
            ingress,
            tc,
        });
        Ok(hook)
    }

    /// Attaches (or replaces the program of the pinned link of) the ingress
    /// program of `hook` on `iface`.
    fn attach_ingress(&mut self, iface: &str, hook: IngressHook) -> Result<(PathBuf, PinnedLink)> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            Error::Datapath(format!("{what} on {iface}: {e}"))
        };
        self.load_ingress(hook)?;
        let pin = self.link_dir.join(hook.link_name(iface));
        let link = match hook {
            IngressHook::Xdp => {
                let xdp: &mut Xdp = program(&mut self.ebpf, XDP_PROGRAM)?;
                let id = match PinnedLink::from_pin(&pin) {
                    Ok(old) => {
                        let link = XdpLink::try_from(FdLink::from(old))
                            .map_err(|e| fail("reusing the pinned XDP link", &e))?;
                        let id = xdp
                            .attach_to_link(link)
                            .map_err(|e| fail("replacing the XDP program", &e))?;
                        info!(iface, "replaced the program of the pinned XDP link");
                        id
                    }
                    // Native only: generic XDP costs more than TC ingress
                    // and is never chosen silently.
                    Err(_) => xdp
                        .attach(iface, XdpMode::Driver)
                        .map_err(|e| fail("attaching native XDP (try --attach tc)", &e))?,
                };
                let link = xdp.take_link(id).map_err(|e| fail("XDP link", &e))?;
                FdLink::try_from(link).map_err(|e| fail("XDP link", &e))?
            }
            IngressHook::Tc => {
                let tc: &mut SchedClassifier = program(&mut self.ebpf, TC_INGRESS_PROGRAM)?;
                let id = attach_tc(tc, iface, &pin, TcAttachType::Ingress)?;
                let link = tc.take_link(id).map_err(|e| fail("TC ingress link", &e))?;
                FdLink::try_from(link).map_err(|e| fail("TC ingress link", &e))?
            }
        };
        Ok((pin.clone(), pin_link(link, &pin)?))
    }

    /// Attaches (or replaces the program of the pinned link of) TC egress.
    fn attach_egress(&mut self, iface: &str) -> Result<(PathBuf, PinnedLink)> {
        let pin = self.link_dir.join(egress_link_name(iface));
        let tc: &mut SchedClassifier = program(&mut self.ebpf, TC_PROGRAM)?;
        let id = attach_tc(tc, iface, &pin, TcAttachType::Egress)?;
        let link = tc
            .take_link(id)
            .map_err(|e| Error::Datapath(format!("TC egress link on {iface}: {e}")))?;
        let link = FdLink::try_from(link)
            .map_err(|e| Error::Datapath(format!("TC egress link on {iface}: {e}")))?;
        Ok((pin.clone(), pin_link(link, &pin)?))
    }

    /// Writes the node-wide settings (`LB_CONFIG`).
    pub fn configure(&mut self, cfg: &lb_common::DatapathConfig) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(pin::CONFIG)
            .ok_or_else(|| Error::Datapath(format!("{} missing from the object", pin::CONFIG)))?;
        let mut array: aya::maps::Array<_, lb_common::DatapathConfig> =
            aya::maps::Array::try_from(map)
                .map_err(|e| Error::Datapath(format!("{}: {e}", pin::CONFIG)))?;
        array
            .set(0, cfg, 0)
            .map_err(|e| Error::Datapath(format!("{}: {e}", pin::CONFIG)))
    }

    /// Detaches every program from every interface (maps stay pinned).
    pub fn detach_all(&mut self) {
        for a in std::mem::take(&mut self.attached) {
            for (path, link) in [a.ingress, a.tc] {
                // Unpinning drops the last reference: the kernel detaches.
                if let Err(e) = link.unpin() {
                    warn!(iface = a.iface, path = %path.display(), error = %e, "unpinning link");
                }
            }
            info!(iface = a.iface, "detached");
        }
    }

    /// Leaves the programs attached (their links stay pinned) so that the
    /// datapath keeps serving while no agent runs.
    pub fn keep_attached(&mut self) {
        for a in std::mem::take(&mut self.attached) {
            info!(iface = a.iface, "left attached (pinned links)");
        }
    }
}

/// The agent's side of the open-flow counting protocol: runs
/// `lb_flow_end` (same object, same pinned maps) through BPF_PROG_TEST_RUN
/// with a [`lb_common::FlowEndV4`] as the packet. A count changes only
/// under the same compare-and-swaps as the datapath's, so the collector can
/// never count a flow twice or race the datapath; and a BPF program cannot
/// be interrupted halfway, so an agent killed at any moment leaves every
/// count consistent.
pub struct FlowCloser {
    ebpf: Ebpf,
}

impl FlowCloser {
    /// Loads `lb_flow_end` against the maps pinned under `opts.bpffs_root`.
    pub fn open(opts: &LoadOptions) -> Result<Self> {
        let dir = pin_dir(&opts.bpffs_root);
        let mut ebpf = pinned_loader(opts, &dir)
            .load(EBPF_OBJECT)
            .map_err(|e| Error::Datapath(format!("loading the eBPF object: {e}")))?;
        let end: &mut Xdp = program(&mut ebpf, FLOW_END_PROGRAM)?;
        end.load()
            .map_err(|e| Error::Datapath(format!("verifier rejected {FLOW_END_PROGRAM}: {e}")))?;
        Ok(Self { ebpf })
    }

    /// Counts flow `key` (its forward conntrack key) down if its registry
    /// entry holds `token`. True if this call counted it down.
    pub fn close(&mut self, key: &lb_common::CtKeyV4, token: u64) -> Result<bool> {
        flow_end(&mut self.ebpf, key, token, lb_common::FLOW_END_CLOSE, 0)
    }

    /// Counts the live flow `key` of `service_id` with its `token` (from its
    /// forward conntrack entry). True if this call counted it.
    pub fn count(&mut self, key: &lb_common::CtKeyV4, token: u64, service_id: u32) -> Result<bool> {
        flow_end(
            &mut self.ebpf,
            key,
            token,
            lb_common::FLOW_END_COUNT,
            service_id,
        )
    }

    /// Deletes the registry entry of `key` if it is closed. True if deleted.
    pub fn retire(&mut self, key: &lb_common::CtKeyV4) -> Result<bool> {
        flow_end(&mut self.ebpf, key, 0, lb_common::FLOW_END_RETIRE, 0)
    }
}

/// Runs `lb_flow_end` of `ebpf` to close flow `key` with `token`.
pub fn close_with(ebpf: &mut Ebpf, key: &lb_common::CtKeyV4, token: u64) -> Result<bool> {
    flow_end(ebpf, key, token, lb_common::FLOW_END_CLOSE, 0)
}

/// Runs `lb_flow_end` of `ebpf` on one request; true if it took effect.
pub fn flow_end(
    ebpf: &mut Ebpf,
    key: &lb_common::CtKeyV4,
    token: u64,
    op: u32,
    service_id: u32,
) -> Result<bool> {
    use aya::{TestRun as _, programs::TestRunOptions};
    let prog: &mut Xdp = program(ebpf, FLOW_END_PROGRAM)?;
    let req = lb_common::FlowEndV4 {
        key: *key,
        token,
        op,
        service_id,
    };
    // SAFETY: `FlowEndV4` is plain old data (repr(C), no padding).
    let bytes: &[u8] = unsafe {
        std::slice::from_raw_parts(
            (&req as *const lb_common::FlowEndV4).cast::<u8>(),
            std::mem::size_of::<lb_common::FlowEndV4>(),
        )
    };
    let mut out = [0u8; 64];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(bytes),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .map_err(|e| Error::Datapath(format!("{FLOW_END_PROGRAM}: {e}")))?;
    Ok(r.return_value == 2) // XDP_PASS
}

/// Pins `link` at `path` (replacing a stale pin of the same link).
/// Attaches TC program `tc` to `iface` at `at`, or replaces the program of
/// the link pinned at `pin` (a previous agent's).
fn attach_tc(
    tc: &mut SchedClassifier,
    iface: &str,
    pin: &Path,
    at: TcAttachType,
) -> Result<aya::programs::tc::SchedClassifierLinkId> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Error::Datapath(format!("{what} ({at:?}) on {iface}: {e}"))
    };
    match PinnedLink::from_pin(pin) {
        Ok(old) => {
            let link = SchedClassifierLink::try_from(FdLink::from(old))
                .map_err(|e| fail("reusing the pinned TC link", &e))?;
            let id = tc
                .attach_to_link(link)
                .map_err(|e| fail("replacing the TC program", &e))?;
            info!(iface, "replaced the program of the pinned TC {at:?} link");
            Ok(id)
        }
        Err(_) => tc.attach(iface, at).map_err(|e| fail("attaching TC", &e)),
    }
}

fn pin_link(link: FdLink, path: &Path) -> Result<PinnedLink> {
    if path.exists() {
        // We hold the link (it was reused from this pin): re-pin it fresh.
        let _ = fs::remove_file(path);
    }
    link.pin(path)
        .map_err(|e| Error::Datapath(format!("pinning link at {}: {e}", path.display())))
}

/// The program `name` of the object, as type `T`.
pub fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Datapath(format!("program {name} missing from the object")))?;
    p.try_into()
        .map_err(|_| Error::Datapath(format!("program {name} has an unexpected type")))
}
