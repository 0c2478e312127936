//! `cargo xtask test`: everything CI checks, in order, with a summary.
//!
//! 1. setup (toolchain always; system tools and bpffs when root);
//! 2. `cargo fmt --check`, `cargo clippy -D warnings`;
//! 3. host tests: `cargo test --workspace` on every target but the kernel
//!    test targets below (which need root and one thread), then doc tests;
//! 4. as root: build lb-agent (debug and release) and the test eBPF object,
//!    then the kernel tests one thread at a time ([`KERNEL_TESTS`]: the
//!    golden packets and the fuzzer of `lb-userspace`, the suites of
//!    `lb-e2e`, the kube-proxy rules, traffic and bench smoke tests of
//!    `lb-bench`).
//!
//! Not root: fails under CI; elsewhere runs 1–3 and says loudly that the
//! kernel tests did not run.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{build, cmd, setup};

/// The kernel test targets: (package, test target, file that must exist).
const KERNEL_TESTS: &[(&str, &str, &str)] = &[
    (
        "lb-userspace",
        "golden",
        "lb-userspace/tests/golden/main.rs",
    ),
    ("lb-userspace", "fuzz", "lb-userspace/tests/fuzz/main.rs"),
    ("lb-e2e", "e2e", "lb-e2e/tests/e2e.rs"),
    ("lb-e2e", "policies", "lb-e2e/tests/policies.rs"),
    ("lb-bench", "kubeproxy", "lb-bench/tests/kubeproxy.rs"),
    ("lb-bench", "traffic", "lb-bench/tests/traffic.rs"),
    ("lb-e2e", "deploy", "lb-e2e/tests/deploy.rs"),
    ("lb-e2e", "kube", "lb-e2e/tests/kube.rs"),
    ("lb-e2e", "cluster", "lb-e2e/tests/cluster.rs"),
    ("lb-e2e", "churn", "lb-e2e/tests/churn.rs"),
    ("lb-e2e", "flood", "lb-e2e/tests/flood.rs"),
    ("lb-bench", "bench", "lb-bench/tests/bench.rs"),
];

#[derive(Debug)]
enum Outcome {
    Passed,
    Failed(String),
    Skipped(String),
}

#[derive(Debug, Default)]
struct Summary {
    steps: Vec<(String, Outcome, Duration)>,
}

impl Summary {
    /// Runs one step, prints a banner, records the outcome.
    fn step(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> bool {
        println!("\n==> {name}");
        let start = Instant::now();
        let result = f();
        let ok = result.is_ok();
        let outcome = match result {
            Ok(()) => Outcome::Passed,
            Err(e) => {
                eprintln!("==> {name}: FAILED: {e:#}");
                Outcome::Failed(format!("{e:#}"))
            }
        };
        self.steps.push((name.to_owned(), outcome, start.elapsed()));
        ok
    }

    fn skip(&mut self, name: &str, why: &str) {
        self.steps.push((
            name.to_owned(),
            Outcome::Skipped(why.to_owned()),
            Duration::ZERO,
        ));
    }

    fn failures(&self) -> usize {
        self.steps
            .iter()
            .filter(|(_, o, _)| matches!(o, Outcome::Failed(_)))
            .count()
    }

    fn print(&self) {
        println!("\n==================== summary ====================");
        for (name, outcome, took) in &self.steps {
            let (word, detail) = match outcome {
                Outcome::Passed => ("ok     ", String::new()),
                Outcome::Failed(e) => ("FAILED ", format!("  {}", first_line(e))),
                Outcome::Skipped(why) => ("SKIPPED", format!("  {why}")),
            };
            println!("{word} {name:<48} {:>6.1}s{detail}", took.as_secs_f64());
        }
        println!("=================================================");
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

fn cargo(args: &[&str]) -> Command {
    let mut c = cmd::cargo();
    c.current_dir(crate::workspace_root()).args(args);
    c
}

/// The integration test targets (`tests/*.rs`) of the workspace members,
/// except the kernel tests.
fn host_test_targets() -> Result<Vec<String>> {
    let json = cmd::output(&mut cargo(&[
        "metadata",
        "--format-version",
        "1",
        "--no-deps",
    ]))?;
    let meta: serde_json::Value = serde_json::from_str(&json).context("parse cargo metadata")?;
    let mut targets = Vec::new();
    for package in meta["packages"].as_array().into_iter().flatten() {
        let package_name = package["name"].as_str().unwrap_or_default();
        for target in package["targets"].as_array().into_iter().flatten() {
            let is_test = target["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "test"));
            let name = target["name"].as_str().unwrap_or_default();
            let kernel = KERNEL_TESTS
                .iter()
                .any(|&(p, t, _)| p == package_name && t == name);
            if is_test && !kernel && !targets.iter().any(|t| t == name) {
                targets.push(name.to_owned());
            }
        }
    }
    Ok(targets)
}

/// The `test` command.
pub fn main() -> Result<()> {
    let root = crate::is_root();
    if !root && crate::is_ci() {
        bail!(
            "CI is set but we are not root: the kernel tests (XDP/TC, network namespaces) \
             need root; run .ci/run as root"
        );
    }
    let mut summary = Summary::default();
    let scope = if root {
        setup::Scope::Full
    } else {
        setup::Scope::Toolchain
    };
    if !summary.step("setup", || setup::ensure(scope, true)) {
        summary.print();
        bail!("setup failed");
    }

    summary.step("cargo fmt --check", || {
        cmd::run(&mut cargo(&["fmt", "--all", "--", "--check"]))
    });
    summary.step("cargo clippy -D warnings", || {
        cmd::run(&mut cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    });
    summary.step("host tests (cargo test --workspace)", || {
        let mut test = cargo(&["test", "--workspace", "--lib", "--bins"]);
        for target in host_test_targets()? {
            test.args(["--test", &target]);
        }
        cmd::run(&mut test)?;
        cmd::run(&mut cargo(&["test", "--workspace", "--doc"]))
    });

    if root {
        let mut agent: Option<(PathBuf, PathBuf)> = None;
        let built = summary.step("build lb-agent", || {
            agent = Some((build::build(false)?, build::build(true)?));
            Ok(())
        });
        for &(package, target, file) in KERNEL_TESTS {
            let name = format!("kernel tests: {package} --test {target}");
            if !crate::workspace_root().join(file).is_file() {
                summary.skip(&name, &format!("{file} does not exist yet"));
                continue;
            }
            let Some((bin, release)) = agent.as_ref().filter(|_| built) else {
                summary.skip(&name, "lb-agent did not build");
                continue;
            };
            summary.step(&name, || {
                cmd::run(
                    cargo(&["test", "-p", package, "--test", target])
                        .args(["--", "--test-threads=1", "--nocapture"])
                        .env("LB_AGENT_BIN", bin)
                        .env("LB_AGENT_RELEASE_BIN", release)
                        .env("LB_TEST_EBPF", lb_testkit::xdp_pass::object_path()),
                )
            });
        }
    } else {
        for &(package, target, _) in KERNEL_TESTS {
            summary.skip(
                &format!("kernel tests: {package} --test {target}"),
                "NOT ROOT",
            );
        }
    }

    summary.print();
    if !root {
        println!(
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !!  NOT ROOT: the kernel tests (golden packets, e2e lab) were NOT run.  !!\n\
             !!  Run `sudo -E cargo xtask test` to run them.                         !!\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
        );
    }
    let failures = summary.failures();
    if failures > 0 {
        bail!("{failures} step(s) failed");
    }
    println!("all steps passed");
    Ok(())
}
