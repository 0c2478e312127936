//! Running external programs with errors that say which command failed and
//! what it printed.

use std::{
    ffi::OsStr,
    path::PathBuf,
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail};

/// Builds a [`Command`] from a program and its arguments.
pub fn command<S: AsRef<OsStr>>(program: &str, args: impl IntoIterator<Item = S>) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd
}

/// The command line of `cmd` as one string, for messages.
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited stdio; fails when it does not exit with 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and captures its output; fails (with its stderr) when it does
/// not exit with 0. Returns stdout.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    check(&line, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` quietly; fails with its stderr when it does not exit with 0.
pub fn quiet(cmd: &mut Command) -> Result<()> {
    output(cmd).map(drop)
}

fn check(line: &str, out: &Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

/// Looks `name` up in `PATH` and in the sbin directories (which a non-root
/// `PATH` often lacks).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The path of `name` for running it, or the bare name when it is not found
/// (so that the error names the program).
pub fn program(name: &str) -> String {
    find_program(name)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.to_owned())
}

/// The `cargo` to run: the one that runs us (`CARGO`), else `cargo` on `PATH`.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}
