//! `cargo xtask image`: the `lb-agent` container image, built offline.
//!
//! 1. `lb-agent` is compiled on the host as a static binary for
//!    [`MUSL_TARGET`] (release; `build.rs` embeds the eBPF object). ring's C
//!    code needs Debian's `musl-tools` (`x86_64-linux-musl-gcc`).
//! 2. The binary and `deploy/Containerfile` are copied into a fresh build
//!    context directory.
//! 3. `buildah bud` builds the image `FROM scratch` (no registry, no daemon)
//!    and tags it [`image_ref`].
//!
//! Docker is not used: building needs its daemon, which this kind of
//! machine cannot run; buildah needs none.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, setup};

/// The Rust target of the static agent.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// The C compiler the musl build of ring looks for (Debian `musl-tools`).
pub const MUSL_GCC: &str = "x86_64-linux-musl-gcc";
/// The image name, without tag. `localhost/` is where buildah and podman
/// put images that come from no registry.
pub const IMAGE_NAME: &str = "localhost/lb-agent";
/// The Containerfile, relative to the workspace root.
pub const CONTAINERFILE: &str = "deploy/Containerfile";

/// `localhost/lb-agent:<workspace version>`, the tag the DaemonSet uses.
pub fn image_ref() -> String {
    format!("{IMAGE_NAME}:{}", env!("CARGO_PKG_VERSION"))
}

/// A built image.
#[derive(Debug, Clone)]
pub struct Image {
    /// Its tag, [`image_ref`].
    pub reference: String,
    /// The image id (sha256, 64 hex digits).
    pub id: String,
    /// Its size as buildah reports it (e.g. `21.3 MB`).
    pub size: String,
    /// The static binary that went into it.
    pub binary: PathBuf,
}

/// The `buildah` program, or an error that says how to get it.
pub fn buildah() -> Result<PathBuf> {
    cmd::find_program("buildah").context(
        "`buildah` not found: it builds the image without a daemon; install it with \
         `cargo xtask setup` (Debian package `buildah`). `docker build` is not a \
         fallback: it needs a Docker daemon, which this machine cannot run",
    )
}

/// Where cargo puts the static release `lb-agent`.
pub fn static_agent_path() -> PathBuf {
    crate::target_dir()
        .join(MUSL_TARGET)
        .join("release")
        .join("lb-agent")
}

/// Adds the musl target to the default toolchain when it is missing.
fn ensure_musl_target() -> Result<()> {
    let installed = cmd::output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l.trim() == MUSL_TARGET) {
        return Ok(());
    }
    println!("image: adding the Rust target {MUSL_TARGET}");
    cmd::run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))
}

/// Builds `lb-agent` as a static musl binary (release) and returns its path.
/// Fails when the result has an ELF interpreter (is not static).
pub fn build_static_agent() -> Result<PathBuf> {
    setup::ensure(setup::Scope::Toolchain, false)?;
    ensure_musl_target()?;
    if cmd::find_program(MUSL_GCC).is_none() {
        bail!(
            "`{MUSL_GCC}` not found: ring (TLS for the Kubernetes client) compiles C for \
             {MUSL_TARGET}; install Debian's `musl-tools` with `cargo xtask setup`"
        );
    }
    let mut cargo = cmd::cargo();
    cargo
        .current_dir(crate::workspace_root())
        .args(["build", "--release", "--target", MUSL_TARGET])
        .args(["-p", "lb-userspace", "--bin", "lb-agent"]);
    cmd::run(&mut cargo)?;
    let bin = static_agent_path();
    if let Some(interp) = lb_testkit::elf_interpreter(&bin)? {
        bail!(
            "{} is dynamically linked (interpreter {interp}); the image has no libc",
            bin.display()
        );
    }
    Ok(bin)
}

/// Builds the static agent, then the image; returns what was built.
pub fn build() -> Result<Image> {
    let buildah = buildah()?;
    let binary = build_static_agent()?;
    let context = tempfile::Builder::new()
        .prefix("lb-agent-image-")
        .tempdir()
        .context("create the build context directory")?;
    let ctx = context.path();
    fs::copy(&binary, ctx.join("lb-agent"))
        .with_context(|| format!("copy {} into the build context", binary.display()))?;
    let containerfile = crate::workspace_root().join(CONTAINERFILE);
    fs::copy(&containerfile, ctx.join("Containerfile"))
        .with_context(|| format!("copy {}", containerfile.display()))?;

    let reference = image_ref();
    let previous = image_id(&buildah, &reference);
    let iidfile = ctx.join("image-id");
    cmd::run(
        Command::new(&buildah)
            .arg("bud")
            .arg("--build-arg")
            .arg(format!("VERSION={}", env!("CARGO_PKG_VERSION")))
            .arg("--iidfile")
            .arg(&iidfile)
            .arg("-f")
            .arg(ctx.join("Containerfile"))
            .args(["-t", &reference])
            .arg(ctx),
    )?;
    let id = fs::read_to_string(&iidfile)
        .with_context(|| format!("read {}", iidfile.display()))?
        .trim()
        .trim_start_matches("sha256:")
        .to_owned();
    // The tag moved: drop the image it left behind, unless a container
    // still uses it (then buildah refuses and it stays).
    if let Some(old) = previous.filter(|old| !id.starts_with(old.as_str())) {
        let _ = cmd::quiet(Command::new(&buildah).args(["rmi", &old]));
    }
    let size = image_size(&buildah, &reference)?;
    Ok(Image {
        reference,
        id,
        size,
        binary,
    })
}

/// The (short) id of image `reference`, if it exists.
fn image_id(buildah: &Path, reference: &str) -> Option<String> {
    let json = cmd::output(Command::new(buildah).args(["images", "--json", reference])).ok()?;
    let list: serde_json::Value = serde_json::from_str(&json).ok()?;
    list.get(0)?["id"].as_str().map(str::to_owned)
}

/// The size of image `reference` as `buildah images` reports it.
fn image_size(buildah: &Path, reference: &str) -> Result<String> {
    let json = cmd::output(Command::new(buildah).args(["images", "--json", reference]))?;
    let list: serde_json::Value =
        serde_json::from_str(&json).context("parse `buildah images --json`")?;
    list.get(0)
        .and_then(|image| image["size"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("`buildah images --json {reference}` printed no size: {json}"))
}

/// The `image` command.
pub fn main() -> Result<()> {
    let image = build()?;
    let bytes = fs::metadata(&image.binary).map(|m| m.len()).unwrap_or(0);
    println!("image {}", image.reference);
    println!("  id     {}", image.id);
    println!("  size   {}", image.size);
    println!(
        "  binary {} ({:.1} MiB, static)",
        image.binary.display(),
        bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_ref_carries_the_workspace_version() {
        assert_eq!(
            image_ref(),
            format!("localhost/lb-agent:{}", env!("CARGO_PKG_VERSION"))
        );
    }
}
