//! The main process of a thin VM, and how it is read from an OCI
//! runtime-spec bundle's `config.json`.
//!
//! Only the fields Skiff needs are read (`process.args/env/cwd/user/
//! terminal`, `hostname`, the `org.opencontainers.image.stopSignal`
//! annotation); every other field is ignored, so any runtime-spec version's
//! config parses. A hand-written subset keeps the static agent small.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::message::User;

/// Annotation that carries the image's stop signal.
pub const STOP_SIGNAL_ANNOTATION: &str = "org.opencontainers.image.stopSignal";
/// Seconds between the stop signal and SIGKILL unless told otherwise.
pub const DEFAULT_STOP_TIMEOUT_SECS: u64 = 10;
/// Largest accepted config.json.
pub const MAX_CONFIG_LEN: usize = 4 * 1024 * 1024;

/// Errors of reading a bundle's config.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// Not valid JSON, or a field of the wrong type.
    #[error("config.json is malformed")]
    Json(#[source] serde_json::Error),
    /// Larger than [`MAX_CONFIG_LEN`].
    #[error("config.json is larger than {MAX_CONFIG_LEN} bytes")]
    TooLarge,
    /// No `process` object.
    #[error("config.json has no process")]
    NoProcess,
    /// `process.args` is empty.
    #[error("process.args is empty")]
    NoArgs,
    /// `process.cwd` is not absolute.
    #[error("process.cwd {0:?} is not absolute")]
    RelativeCwd(String),
    /// The stop-signal annotation names no known signal.
    #[error("unknown stop signal {0:?}")]
    BadSignal(String),
}

/// What happens when the main process exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Report the status and power off.
    #[default]
    Never,
    /// Restart it whatever the status.
    Always,
    /// Restart it unless it exited with 0.
    OnFailure,
}

impl RestartPolicy {
    /// Whether a process that ended with `code` (shell-style) is restarted.
    pub fn restarts(self, code: i32) -> bool {
        match self {
            RestartPolicy::Never => false,
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => code != 0,
        }
    }
}

/// The main process of a thin VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MainProcess {
    /// Program and arguments.
    pub args: Vec<String>,
    /// Environment, `KEY=VALUE`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory.
    #[serde(default = "root_dir")]
    pub cwd: String,
    /// Identity.
    #[serde(default)]
    pub user: User,
    /// Whether it runs on a TTY (the console).
    #[serde(default)]
    pub terminal: bool,
    /// Hostname to set before it starts.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Signal that asks it to stop.
    #[serde(default = "sigterm")]
    pub stop_signal: i32,
    /// Seconds between the stop signal and SIGKILL.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_secs: u64,
    /// What happens when it exits.
    #[serde(default)]
    pub restart: RestartPolicy,
}

fn root_dir() -> String {
    "/".into()
}
fn sigterm() -> i32 {
    libc::SIGTERM
}
fn default_stop_timeout() -> u64 {
    DEFAULT_STOP_TIMEOUT_SECS
}

#[derive(Deserialize)]
struct Spec {
    process: Option<SpecProcess>,
    hostname: Option<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecProcess {
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default = "root_dir")]
    cwd: String,
    #[serde(default)]
    user: SpecUser,
    #[serde(default)]
    terminal: bool,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct SpecUser {
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
    #[serde(default)]
    additional_gids: Vec<u32>,
}

/// Reads the main process out of an OCI runtime-spec `config.json`.
pub fn main_process_from_config(json: &[u8]) -> Result<MainProcess, OciError> {
    if json.len() > MAX_CONFIG_LEN {
        return Err(OciError::TooLarge);
    }
    let spec: Spec = serde_json::from_slice(json).map_err(OciError::Json)?;
    let p = spec.process.ok_or(OciError::NoProcess)?;
    if p.args.is_empty() {
        return Err(OciError::NoArgs);
    }
    if !p.cwd.starts_with('/') {
        return Err(OciError::RelativeCwd(p.cwd));
    }
    let stop_signal = match spec.annotations.get(STOP_SIGNAL_ANNOTATION) {
        Some(name) => parse_signal(name).ok_or_else(|| OciError::BadSignal(name.clone()))?,
        None => libc::SIGTERM,
    };
    Ok(MainProcess {
        args: p.args,
        env: p.env,
        cwd: p.cwd,
        user: User {
            uid: p.user.uid,
            gid: p.user.gid,
            additional_gids: p.user.additional_gids,
        },
        terminal: p.terminal,
        hostname: spec.hostname.filter(|h| !h.is_empty()),
        stop_signal,
        stop_timeout_secs: DEFAULT_STOP_TIMEOUT_SECS,
        restart: RestartPolicy::Never,
    })
}

/// Parses a signal given as `SIGTERM`, `TERM` or `15`.
pub fn parse_signal(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let name = s.strip_prefix("SIG").unwrap_or(s);
    Some(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "WINCH" => libc::SIGWINCH,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        "PWR" => libc::SIGPWR,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The shape umoci / skiff-oci write for an nginx-like image.
    const CONFIG: &str = r#"{
      "ociVersion": "1.0.2",
      "process": {
        "terminal": false,
        "user": {"uid": 101, "gid": 101, "additionalGids": [4, 27]},
        "args": ["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"],
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "NGINX_VERSION=1.27"],
        "cwd": "/srv",
        "capabilities": {"bounding": ["CAP_CHOWN"]},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
      },
      "root": {"path": "rootfs"},
      "hostname": "web",
      "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
      "annotations": {"org.opencontainers.image.stopSignal": "SIGQUIT"},
      "linux": {"namespaces": [{"type": "pid"}]}
    }"#;

    #[test]
    fn reads_process_hostname_and_stop_signal() {
        let p = main_process_from_config(CONFIG.as_bytes()).unwrap();
        assert_eq!(
            p.args,
            ["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"]
        );
        assert_eq!(p.env[1], "NGINX_VERSION=1.27");
        assert_eq!(p.cwd, "/srv");
        assert_eq!(
            p.user,
            User {
                uid: 101,
                gid: 101,
                additional_gids: vec![4, 27]
            }
        );
        assert_eq!(p.hostname.as_deref(), Some("web"));
        assert_eq!(p.stop_signal, libc::SIGQUIT);
        assert!(!p.terminal);
        assert_eq!(p.restart, RestartPolicy::Never);
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let p = main_process_from_config(br#"{"process":{"args":["sh"]}}"#).unwrap();
        assert_eq!(p.cwd, "/");
        assert_eq!(p.user, User::default());
        assert_eq!(p.stop_signal, libc::SIGTERM);
        assert_eq!(p.hostname, None);
    }

    #[test]
    fn rejects_bad_configs() {
        let table: &[(&str, &str)] = &[
            ("{", "malformed"),
            (r#"{"hostname":"x"}"#, "no process"),
            (r#"{"process":{"args":[]}}"#, "empty"),
            (r#"{"process":{"args":["a"],"cwd":"srv"}}"#, "not absolute"),
            (
                r#"{"process":{"args":["a"],"user":{"uid":-1}}}"#,
                "malformed",
            ),
            (
                r#"{"process":{"args":["a"]},"annotations":{"org.opencontainers.image.stopSignal":"SIGNOPE"}}"#,
                "unknown stop signal",
            ),
        ];
        for (json, want) in table {
            let err = main_process_from_config(json.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
    }

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("SIGTERM"), Some(15));
        assert_eq!(parse_signal("KILL"), Some(9));
        assert_eq!(parse_signal("2"), Some(2));
        assert_eq!(parse_signal("0"), None);
        assert_eq!(parse_signal("SIGFOO"), None);
    }

    #[test]
    fn restart_policy() {
        assert!(!RestartPolicy::Never.restarts(1));
        assert!(RestartPolicy::Always.restarts(0));
        assert!(RestartPolicy::OnFailure.restarts(137));
        assert!(!RestartPolicy::OnFailure.restarts(0));
    }
}
