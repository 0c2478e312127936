//! Developer commands for the load balancer workspace, and the
//! network-namespace lab that the demo and the end-to-end tests share.
//!
//! `src/main.rs` is only the command line; each command lives in its own
//! module here so that the tests (`tests/e2e.rs`) can reuse the lab.

pub mod apiserver;
pub mod bench;
pub mod build;
pub mod cmd;
pub mod demo;
pub mod fuzz;
pub mod image;
pub mod kubeproxy;
pub mod lab;
pub mod run;
pub mod setup;
pub mod test;
pub mod traffic;

use std::path::PathBuf;

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

/// Whether the process runs with effective uid 0 (needed for namespaces, BPF
/// and package installs).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether we run under CI (`CI` set to anything but `false` or empty).
pub fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}
