//! Loads the embedded eBPF object, pins its maps (reusing pins left by a
//! previous run, so conntrack and counters survive a restart), and attaches
//! the XDP and TC programs to the node's interfaces.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode, tc::SchedClassifierLinkId, xdp::XdpLinkId,
    },
};
use lb_common::{MAP_VERSION, pin};
use tracing::{info, warn};

use crate::error::{Error, Result};

/// The compiled datapath (`lb-ebpf`), built by `build.rs` with BTF.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Name of the XDP program in the object.
pub const XDP_PROGRAM: &str = "lb_xdp";
/// Name of the TC egress program in the object.
pub const TC_PROGRAM: &str = "lb_tc_egress";

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How to load the datapath.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Root under which maps are pinned (`<root>/v<MAP_VERSION>/<MAP>`).
    pub bpffs_root: PathBuf,
    /// Conntrack entries (two per flow). Only applies when the map is created;
    /// a pinned map keeps its size.
    pub ct_capacity: u32,
}

/// The loaded datapath: programs, maps and the interfaces it is attached to.
pub struct Datapath {
    /// The aya object (programs and maps).
    pub ebpf: Ebpf,
    /// Directory holding the pins.
    pub pin_dir: PathBuf,
    attached: Vec<(String, XdpLinkId, SchedClassifierLinkId)>,
}

/// The directory where maps of this layout version are pinned.
pub fn pin_dir(bpffs_root: &Path) -> PathBuf {
    bpffs_root.join(format!("v{MAP_VERSION}"))
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
        let paths: Vec<(&str, PathBuf)> = pin::ALL.iter().map(|n| (*n, dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            if path.exists() {
                info!(map = name, path = %path.display(), "reusing pinned map");
            }
            loader.map_pin_path(name, path.as_path());
        }
        loader.map_max_entries(pin::CONNTRACK_V4, opts.ct_capacity);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| Error::Datapath(format!("loading the eBPF object: {e}")))?;

        let xdp: &mut Xdp = program(&mut ebpf, XDP_PROGRAM)?;
        xdp.load()
            .map_err(|e| Error::Datapath(format!("verifier rejected {XDP_PROGRAM}: {e}")))?;
        let tc: &mut SchedClassifier = program(&mut ebpf, TC_PROGRAM)?;
        tc.load()
            .map_err(|e| Error::Datapath(format!("verifier rejected {TC_PROGRAM}: {e}")))?;
        Ok(Self {
            ebpf,
            pin_dir: dir,
            attached: Vec::new(),
        })
    }

    /// Attaches XDP (ingress; native mode when the driver supports it, else
    /// generic) and TC egress to `iface`.
    pub fn attach(&mut self, iface: &str) -> Result<()> {
        let xdp: &mut Xdp = program(&mut self.ebpf, XDP_PROGRAM)?;
        let xdp_link = match xdp.attach(iface, XdpMode::Driver) {
            Ok(l) => l,
            Err(e) => {
                warn!(iface, error = %e, "native XDP unavailable, using generic (skb) mode");
                xdp.attach(iface, XdpMode::Skb)
                    .map_err(|e| Error::Datapath(format!("attaching XDP to {iface}: {e}")))?
            }
        };
        let tc: &mut SchedClassifier = program(&mut self.ebpf, TC_PROGRAM)?;
        let tc_link = tc
            .attach(iface, TcAttachType::Egress)
            .map_err(|e| Error::Datapath(format!("attaching TC egress to {iface}: {e}")))?;
        info!(iface, "attached XDP ingress and TC egress");
        self.attached.push((iface.to_string(), xdp_link, tc_link));
        Ok(())
    }

    /// Detaches every program from every interface (maps stay pinned).
    pub fn detach_all(&mut self) {
        for (iface, xdp_link, tc_link) in std::mem::take(&mut self.attached) {
            if let Ok(xdp) = program::<Xdp>(&mut self.ebpf, XDP_PROGRAM)
                && let Err(e) = xdp.detach(xdp_link)
            {
                warn!(iface, error = %e, "detaching XDP");
            }
            if let Ok(tc) = program::<SchedClassifier>(&mut self.ebpf, TC_PROGRAM)
                && let Err(e) = tc.detach(tc_link)
            {
                warn!(iface, error = %e, "detaching TC");
            }
            info!(iface, "detached");
        }
    }
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
