//! The `lxc-*` tools of Debian's `lxc` package (LXC 5), run with a
//! container path (`-P`) of Skiff's own, so Skiff's containers never mix
//! with the host's. Each call has a deadline; a failure carries what the
//! tool printed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// How long a tool may take, unless a call says otherwise.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);
/// The most of a tool's output kept for an error.
const MAX_OUTPUT: usize = 4096;

/// Errors of the tools.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// LXC is not installed.
    #[error("{0} is missing: install Debian's lxc package (scripts/setup does)")]
    Missing(&'static str),
    /// The tool could not be run.
    #[error("running {0}")]
    Spawn(&'static str, #[source] std::io::Error),
    /// It failed.
    #[error("{tool} {args} failed ({status}): {output}")]
    Failed {
        /// The tool.
        tool: &'static str,
        /// Its arguments.
        args: String,
        /// Its exit status.
        status: String,
        /// The end of what it printed.
        output: String,
    },
    /// It did not finish in time.
    #[error("{0} {1} did not finish within {2:?}")]
    Timeout(&'static str, String, Duration),
}

/// The state LXC reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not running.
    Stopped,
    /// Running (or starting, stopping).
    Running,
    /// Frozen.
    Frozen,
}

/// Skiff's LXC container path.
#[derive(Debug, Clone)]
pub struct Lxc {
    path: PathBuf,
}

fn tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    let cut = s.len().saturating_sub(MAX_OUTPUT);
    let cut = (cut..=s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(s.len());
    s[cut..].to_string()
}

impl Lxc {
    /// Containers under `path` (`lxc.lxcpath`).
    pub fn new(path: PathBuf) -> Lxc {
        Lxc { path }
    }

    /// The container path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A container's directory (its `config`, log and runtime files).
    pub fn dir(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Whether the tools are installed.
    pub fn available() -> Result<(), ToolError> {
        for tool in ["lxc-start", "lxc-stop", "lxc-info", "lxc-attach"] {
            let found = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
                .unwrap_or(false);
            if !found {
                return Err(ToolError::Missing(tool));
            }
        }
        Ok(())
    }

    /// Runs `tool -n name -P path args...`; its stdout on success.
    pub async fn run(
        &self,
        tool: &'static str,
        name: &str,
        args: &[&str],
        deadline: Option<Duration>,
    ) -> Result<String, ToolError> {
        let deadline = deadline.unwrap_or(DEFAULT_DEADLINE);
        let mut cmd = Command::new(tool);
        cmd.arg("-n").arg(name).arg("-P").arg(&self.path).args(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let shown = args.join(" ");
        let out = match tokio::time::timeout(deadline, cmd.output()).await {
            Err(_) => return Err(ToolError::Timeout(tool, format!("-n {name} {shown}"), deadline)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Err(ToolError::Missing(tool)),
            Ok(Err(e)) => return Err(ToolError::Spawn(tool, e)),
            Ok(Ok(o)) => o,
        };
        if !out.status.success() {
            let mut output = tail(&out.stderr);
            if output.is_empty() {
                output = tail(&out.stdout);
            }
            return Err(ToolError::Failed {
                tool,
                args: format!("-n {name} {shown}"),
                status: out.status.to_string(),
                output,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts the container in the background from its `config`.
    pub async fn start(&self, name: &str) -> Result<(), ToolError> {
        let log = self.dir(name).join("lxc.log");
        let log = log.to_string_lossy().into_owned();
        self.run("lxc-start", name, &["-d", "-o", &log, "-l", "INFO"], Some(Duration::from_secs(60))).await.map(drop)
    }

    /// Its state; `Stopped` when LXC does not know it.
    pub async fn state(&self, name: &str) -> Result<State, ToolError> {
        if !self.dir(name).join("config").is_file() {
            return Ok(State::Stopped);
        }
        let out = self.run("lxc-info", name, &["-s", "-H"], None).await?;
        Ok(match out.trim() {
            "RUNNING" | "STARTING" | "STOPPING" | "ABORTING" => State::Running,
            "FROZEN" | "FREEZING" | "THAWED" => State::Frozen,
            _ => State::Stopped,
        })
    }

    /// The host pid of its init, when it runs.
    pub async fn init_pid(&self, name: &str) -> Result<Option<i32>, ToolError> {
        if !self.dir(name).join("config").is_file() {
            return Ok(None);
        }
        let out = self.run("lxc-info", name, &["-p", "-H"], None).await?;
        Ok(out.trim().parse().ok().filter(|p| *p > 0))
    }

    /// Stops it: a clean shutdown within `timeout` (SIGPWR to its init,
    /// then SIGKILL), or a kill at once with `force`.
    pub async fn stop(&self, name: &str, timeout: Duration, force: bool) -> Result<(), ToolError> {
        if force {
            return self.run("lxc-stop", name, &["-k"], None).await.map(drop);
        }
        let secs = timeout.as_secs().max(1).to_string();
        let deadline = timeout + Duration::from_secs(30);
        self.run("lxc-stop", name, &["-t", &secs], Some(deadline)).await.map(drop)
    }

    /// Freezes or thaws it.
    pub async fn freeze(&self, name: &str, frozen: bool) -> Result<(), ToolError> {
        let tool = if frozen { "lxc-freeze" } else { "lxc-unfreeze" };
        self.run(tool, name, &[], None).await.map(drop)
    }

    /// Sets a cgroup value of the running container (`memory.limit_in_bytes`, `pids.max`...).
    pub async fn cgroup_set(&self, name: &str, key: &str, value: &str) -> Result<(), ToolError> {
        self.run("lxc-cgroup", name, &[key, value], None).await.map(drop)
    }

    /// Reads a cgroup value of the running container.
    pub async fn cgroup_get(&self, name: &str, key: &str) -> Result<String, ToolError> {
        self.run("lxc-cgroup", name, &[key], None).await.map(|s| s.trim().to_string())
    }

    /// Runs a command in the running container (for starting its agent).
    pub async fn attach(&self, name: &str, command: &[&str]) -> Result<String, ToolError> {
        let mut args = vec!["--clear-env", "--"];
        args.extend_from_slice(command);
        self.run("lxc-attach", name, &args, None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_output_keeps_its_end() {
        let long = format!("{}END", "x".repeat(10_000));
        let t = tail(long.as_bytes());
        assert_eq!(t.len(), MAX_OUTPUT);
        assert!(t.ends_with("END"));
    }
}
