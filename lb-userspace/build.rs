//! Builds `lb-ebpf` for the BPF target with aya-build (nightly + bpf-linker,
//! `-C debuginfo=2 -C link-arg=--btf`) and leaves the object in `OUT_DIR/lb`,
//! where `src/loader.rs` embeds it.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("lb-ebpf manifest has no parent"))?;
    // LB_BPF_TOOLCHAIN pins another nightly (e.g. nightly-2026-05-19).
    println!("cargo:rerun-if-env-changed=LB_BPF_TOOLCHAIN");
    let toolchain = std::env::var("LB_BPF_TOOLCHAIN").ok();
    let toolchain = match toolchain.as_deref() {
        Some(t) => Toolchain::Custom(t),
        None => Toolchain::Nightly,
    };
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        toolchain,
    )
}
