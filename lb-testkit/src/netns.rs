//! Named network namespaces (`ip netns`), running code inside one, and
//! removing what a crashed earlier run left behind.

use std::{
    fs::File,
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    thread,
};

use anyhow::{Context as _, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};

use crate::cmd;

/// Prefix of every namespace, bpffs directory and temporary directory a
/// topology creates: `lbt-<pid>-<tag><n>-<role>` (see
/// [`crate::topology::Site`]).
pub const PREFIX: &str = "lbt-";

/// Where bpffs is mounted; each topology pins under `<BPFFS>/<prefix>`.
pub const BPFFS: &str = "/sys/fs/bpf";

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` with `lo` up.
    pub fn create(name: String) -> Result<Self> {
        cmd::quiet(Command::new(cmd::program("ip")).args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its file under `/run/netns`.
    pub fn path(&self) -> PathBuf {
        path_of(&self.name)
    }

    /// Runs `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        cmd::quiet(
            Command::new(cmd::program("ip"))
                .args(["-n", &self.name])
                .args(args),
        )
    }

    /// Runs `ip -n <ns> -batch -` with `commands`, one per line: one process
    /// for many commands. The error shows the whole input.
    pub fn ip_batch(&self, commands: &[String]) -> Result<()> {
        let mut child = Command::new(cmd::program("ip"))
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn ip -batch")?;
        let mut input = commands.join("\n");
        input.push('\n');
        child
            .stdin
            .take()
            .context("stdin of ip -batch")?
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "`ip -n {} -batch -` failed ({}): {}\ninput:\n{input}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Turns transmit checksum offload off on `iface` (`ethtool -K IFACE tx
    /// off`). A veth otherwise hands its peer packets whose checksum is
    /// still to be filled in (partial checksums), and XDP on the receiving
    /// side sees them so: a program that checks or rewrites checksums needs
    /// full ones.
    pub fn tx_checksum_off(&self, iface: &str) -> Result<()> {
        cmd::quiet(self.command("ethtool").args(["-K", iface, "tx", "off"]))
    }

    /// A command that runs `program` in this namespace only (`nsenter --net`,
    /// which keeps the host's mounts, so bpffs stays visible).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(cmd::program("nsenter"));
        c.arg(format!("--net={}", self.path().display()))
            .arg(cmd::program(program));
        c
    }

    /// Sets a sysctl inside the namespace (`net.*` keys are per namespace)
    /// with the `sysctl` tool; [`Netns::write_sysctls`] sets several
    /// without a process.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        cmd::quiet(
            self.command("sysctl")
                .arg("-q")
                .arg("-w")
                .arg(format!("{key}={value}")),
        )
    }

    /// Writes `net.*` sysctls (`/proc/sys` follows the writer's namespace)
    /// from a thread inside the namespace: no process per key.
    pub fn write_sysctls(&self, values: &[(&str, &str)]) -> Result<()> {
        let values: Vec<(String, String)> = values
            .iter()
            .map(|(k, v)| {
                (
                    format!("/proc/sys/{}", k.replace('.', "/")),
                    (*v).to_owned(),
                )
            })
            .collect();
        self.run(move || -> Result<()> {
            for (path, value) in &values {
                std::fs::write(path, value)
                    .with_context(|| format!("write {value:?} to {path}"))?;
            }
            Ok(())
        })?
        .with_context(|| format!("sysctls of {}", self.name))
    }

    /// The packet counters of interface `iface` (`ip -s -j link show`).
    pub fn link_stats(&self, iface: &str) -> Result<LinkStats> {
        let json = cmd::output(
            Command::new(cmd::program("ip"))
                .args(["-n", &self.name, "-s", "-j", "link", "show", iface]),
        )?;
        let v: serde_json::Value = serde_json::from_str(&json)
            .with_context(|| format!("parse `ip -s -j link show {iface}`"))?;
        let stats = &v[0]["stats64"];
        let n = |dir: &str, field: &str| stats[dir][field].as_u64().unwrap_or(0);
        Ok(LinkStats {
            rx_packets: n("rx", "packets"),
            rx_dropped: n("rx", "dropped"),
            tx_packets: n("tx", "packets"),
            tx_dropped: n("tx", "dropped"),
        })
    }

    /// Runs `f` on a thread that has entered this namespace; see [`in_netns`].
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        in_netns(&self.name, f)
    }
}

/// An interface's packet counters (see [`Netns::link_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Packets received.
    pub rx_packets: u64,
    /// Packets dropped on receipt (for a veth: by its peer's transmit, e.g.
    /// a full XDP ring).
    pub rx_dropped: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Packets dropped on transmit.
    pub tx_dropped: u64,
}

impl LinkStats {
    /// The counts since `before`.
    pub fn since(&self, before: &Self) -> Self {
        Self {
            rx_packets: self.rx_packets.saturating_sub(before.rx_packets),
            rx_dropped: self.rx_dropped.saturating_sub(before.rx_dropped),
            tx_packets: self.tx_packets.saturating_sub(before.tx_packets),
            tx_dropped: self.tx_dropped.saturating_sub(before.tx_dropped),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = delete(&self.name) {
            eprintln!("lab: cleanup: {e:#}");
        }
    }
}

/// `/run/netns/<name>`.
pub fn path_of(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Runs `f` on a new thread that first enters the network namespace `name`,
/// and returns its result. Sockets created by `f` stay in that namespace
/// whatever thread uses them later, and threads `f` spawns inherit it.
pub fn in_netns<T, F>(name: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = path_of(name);
    let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    let handle = thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || -> Result<T> {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into {}", path.display()))?;
            Ok(f())
        })
        .context("spawn thread")?;
    handle
        .join()
        .map_err(|_| anyhow!("thread inside netns {name} panicked"))?
}

/// Deletes a namespace, first killing any process still inside it.
fn delete(name: &str) -> Result<()> {
    if !path_of(name).exists() {
        return Ok(());
    }
    if let Ok(pids) = cmd::output(Command::new(cmd::program("ip")).args(["netns", "pids", name])) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            if pid != std::process::id() as i32 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    cmd::quiet(Command::new(cmd::program("ip")).args(["netns", "del", name]))
}

/// The pid that created a lab name `lbt-<pid>-...`.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Whether the process that created `name` is gone (so the object is a
/// leftover of a crashed run and safe to remove).
fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !PathBuf::from(format!("/proc/{pid}")).exists())
}

/// Removes namespaces (with their processes), bpffs directories and temporary
/// directories left by
/// lab runs whose process no longer exists. Labs of live processes (another
/// test run at the same time) are left alone.
pub fn remove_stale() {
    if let Ok(list) = std::fs::read_dir("/run/netns") {
        for entry in list.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_stale(&name) {
                eprintln!("lab: removing leftover namespace {name}");
                if let Err(e) = delete(&name) {
                    eprintln!("lab: {e:#}");
                }
            }
        }
    }
    // Pins, and the temporary directories (logs) of failed runs.
    for dir in [PathBuf::from(BPFFS), std::env::temp_dir()] {
        let Ok(list) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in list.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_stale(&name) {
                eprintln!("lab: removing leftover {}", entry.path().display());
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_lab_names() {
        assert_eq!(owner_pid("lbt-1234-1-node"), Some(1234));
        assert_eq!(owner_pid("lbt-1234-2"), Some(1234));
        assert_eq!(owner_pid("other-1234"), None);
        assert_eq!(owner_pid("lbt-x-1"), None);
        assert!(!is_stale(&format!("lbt-{}-1-node", std::process::id())));
    }
}
