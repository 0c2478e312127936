//! What the tests, the benches and the demo share, and the product does not
//! ship: the network-namespace lab (one node with pods, or a two-node
//! cluster), its clients and servers, the agent run as a process, the
//! Kubernetes API-server double, the root guard, and running programs.
//!
//! Nothing here is part of `lb-agent`; the crate is `publish = false` and a
//! dev-dependency everywhere except in `xtask`, whose demo runs the lab.

pub mod apiserver;
pub mod cmd;
pub mod fixtures;
pub mod guard;
pub mod lab;
pub mod netns;
pub mod topology;
pub mod xdp_pass;

use std::path::PathBuf;

pub use guard::{is_ci, is_root};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// The cargo target directory: `CARGO_TARGET_DIR` when set, else
/// `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Where cargo puts `lb-agent` for a profile.
pub fn agent_path(release: bool) -> PathBuf {
    target_dir()
        .join(if release { "release" } else { "debug" })
        .join("lb-agent")
}

/// Whether `/sys/fs/bpf` is a mounted bpffs.
pub fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            let mut fields = line.split_whitespace().skip(1);
            fields.next() == Some("/sys/fs/bpf") && fields.next() == Some("bpf")
        })
    })
}

/// The ELF interpreter (`PT_INTERP`) of an executable, `None` for a static
/// one (what `cargo xtask image` requires of the agent it puts in a `FROM
/// scratch` image).
pub fn elf_interpreter(path: &std::path::Path) -> anyhow::Result<Option<String>> {
    use anyhow::Context as _;
    use object::read::elf::{FileHeader as _, ProgramHeader as _};
    let data = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let data = &*data;
    let header = object::elf::FileHeader64::<object::Endianness>::parse(data)
        .with_context(|| format!("{} is not an ELF64 file", path.display()))?;
    let endian = header.endian()?;
    for ph in header.program_headers(endian, data)? {
        if let Some(raw) = ph.interpreter(endian, data)? {
            return Ok(Some(String::from_utf8_lossy(raw).into_owned()));
        }
    }
    Ok(None)
}
