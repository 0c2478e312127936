//! The `lb-agent` process under test: started in the node namespace with
//! `nsenter --net` (so it sees the host's bpffs), watched through its log,
//! reloaded with SIGHUP, stopped with SIGTERM.

use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::netns::Netns;
use crate::cmd;

/// How long to wait for a `synced` (or `reload rejected`) log line.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent gets to exit after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The log marker of a successful map sync (initial and after each reload).
pub const SYNCED: &str = "synced";
/// The log marker of a reload that kept the previous state.
pub const REJECTED: &str = "reload rejected";
/// The log marker of the programs attached to one interface. The agent's
/// first `synced` comes before it attaches, so start-up waits for both.
pub const ATTACHED: &str = " ingress and TC egress";

/// The agent binary: `LB_AGENT_BIN`, else `<target>/debug/lb-agent`.
pub fn binary() -> Result<PathBuf> {
    built("LB_AGENT_BIN", false)
}

/// The release build of the agent, which the benches measure:
/// `LB_AGENT_RELEASE_BIN`, else `<target>/release/lb-agent`.
pub fn release_binary() -> Result<PathBuf> {
    built("LB_AGENT_RELEASE_BIN", true)
}

fn built(var: &str, release: bool) -> Result<PathBuf> {
    let bin = match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => crate::agent_path(release),
    };
    if !bin.is_file() {
        bail!(
            "lb-agent binary {} not found: build it with `cargo xtask build{}` (or set {var})",
            bin.display(),
            if release { " --release" } else { "" }
        );
    }
    Ok(bin)
}

/// A running agent; stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

/// How the agent was started.
#[derive(Debug, Clone)]
pub struct AgentConfig<'a> {
    /// The `lb-agent` binary.
    pub bin: &'a Path,
    /// Interfaces to attach to, inside the node namespace.
    pub interfaces: &'a [&'a str],
    /// Where the agent reads services from.
    pub source: AgentSource<'a>,
    /// More arguments after `run …` (e.g. `--keep-datapath-on-exit`).
    pub extra_args: &'a [String],
    /// `--node-name`.
    pub node_name: &'a str,
    /// `--bpffs-root`.
    pub bpffs_root: &'a Path,
    /// Where stdout and stderr go.
    pub log: &'a Path,
    /// A command (program and arguments) that runs the agent, put between
    /// `nsenter --net=…` and the agent's binary, e.g. `setpriv
    /// --bounding-set=…` to restrict its capabilities. Empty: none.
    pub wrapper: &'a [String],
}

/// The agent's source of Services and EndpointSlices.
#[derive(Debug, Clone, Copy)]
pub enum AgentSource<'a> {
    /// `--manifests FILE_OR_DIR`.
    Manifests(&'a Path),
    /// `--kubeconfig FILE` (an API server, e.g. the double in `crate::apiserver`).
    Kubeconfig(&'a Path),
}

impl Agent {
    /// Starts the agent in `node` and waits for its first `synced` line and
    /// an `attached … ingress and TC egress` line per interface.
    pub fn start(node: &Netns, cfg: &AgentConfig<'_>) -> Result<Self> {
        let mut agent = Self::spawn(node, cfg)?;
        agent.wait_for(SYNCED, 1)?;
        Ok(agent)
    }

    /// Starts the agent in `node` and waits only for an `attached … ingress and TC egress` line
    /// per interface (not for a sync).
    pub fn spawn(node: &Netns, cfg: &AgentConfig<'_>) -> Result<Self> {
        let log = File::create(cfg.log).with_context(|| format!("create {}", cfg.log.display()))?;
        let mut command = Command::new(cmd::program("nsenter"));
        command
            .arg(format!("--net={}", node.path().display()))
            .args(cfg.wrapper)
            .arg(cfg.bin)
            .arg("run");
        for iface in cfg.interfaces {
            command.args(["--interface", iface]);
        }
        match cfg.source {
            AgentSource::Manifests(path) => command.arg("--manifests").arg(path),
            AgentSource::Kubeconfig(path) => command.arg("--kubeconfig").arg(path),
        };
        command
            .args(cfg.extra_args)
            .args(["--node-name", cfg.node_name])
            .arg("--bpffs-root")
            .arg(cfg.bpffs_root)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C in the terminal reaches the
            // demo, which then stops the agent in order.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        // If this process dies without cleaning up, the agent gets SIGTERM
        // (when the thread that started it ends, so start it from a thread
        // that outlives it).
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        eprintln!("lab: {}", cmd::display(&command));
        let child = command.spawn().context("spawn nsenter lb-agent")?;
        let mut agent = Self {
            child: Some(child),
            log: cfg.log.to_owned(),
        };
        agent.wait_for(ATTACHED, cfg.interfaces.len())?;
        Ok(agent)
    }

    /// The agent's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Number of log lines that contain `marker` (`synced` lines that say
    /// `reload rejected` are not counted as syncs).
    pub fn count(&self, marker: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains(marker) && (marker != SYNCED || !l.contains(REJECTED)))
            .count()
    }

    /// Waits until `marker` appears on at least `n` lines; fails, with the
    /// log, on timeout or if the agent exits.
    pub fn wait_for(&mut self, marker: &str, n: usize) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.count(marker) >= n {
                return Ok(());
            }
            if let Some(status) = self.exited()? {
                bail!(
                    "lb-agent exited ({status}) before logging `{marker}` #{n}; log:\n{}",
                    self.log()
                );
            }
            if start.elapsed() > SYNC_TIMEOUT {
                bail!(
                    "no `{marker}` #{n} in the lb-agent log after {SYNC_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            if super::interrupted() {
                bail!("interrupted");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGHUP and waits for the next line with `marker` (`synced` for
    /// a good manifest, `reload rejected` for a bad one).
    pub fn reload(&mut self, marker: &str) -> Result<()> {
        let before = self.count(marker);
        self.signal(Signal::SIGHUP)?;
        self.wait_for(marker, before + 1)
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().context("agent already stopped")?;
        kill(Pid::from_raw(pid as i32), signal).with_context(|| format!("kill -{signal} {pid}"))
    }

    /// Whether the agent process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.exited(), Ok(None))
    }

    /// Some(status) when the agent has exited.
    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("agent already stopped"),
        }
    }

    /// SIGKILL, as a crash or an OOM kill would: the agent cleans nothing up.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, wait up to [`STOP_TIMEOUT`], then SIGKILL. Returns how it
    /// exited (`None` when it had to be killed).
    pub fn stop(&mut self) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < STOP_TIMEOUT {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("lab: lb-agent did not exit within {STOP_TIMEOUT:?} of SIGTERM; killing it");
        child.kill()?;
        child.wait()?;
        Ok(None)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("lab: stopping lb-agent: {e:#}");
        }
    }
}
