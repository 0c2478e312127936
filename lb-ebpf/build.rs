use which::which;

/// Rebuild when bpf-linker changes (a new linker may emit different code),
/// and fail early with a clear message when it is missing.
fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    if !target.starts_with("bpf") {
        return;
    }
    let linker = which("bpf-linker").unwrap_or_else(|e| {
        panic!("bpf-linker not found ({e}); run `cargo xtask setup` or .ci/run to install it")
    });
    println!("cargo:rerun-if-changed={}", linker.display());
}
