//! Per-VM runtime directories (`/run/skiff-run/NAME` as root, else under
//! `$XDG_RUNTIME_DIR`): the sockets, logs and `state.json` of one running
//! VM; `list`, `exec` and `kill` find VMs through them. And the cache
//! directory for kernels and initramfs images.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The state file in a runtime directory.
pub const STATE_FILE: &str = "state.json";
/// The VMM's hybrid vsock socket (the agent is behind it).
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// A full OS VM's serial console, interactive (skiff-vmm's
/// `--serial socket=`): its one client sees the output and types.
pub const SERIAL_SOCKET: &str = "serial.sock";
/// The runner's control socket (`signal N` lines).
pub const CONTROL_SOCKET: &str = "control.sock";
/// The guest's serial console.
pub const CONSOLE_LOG: &str = "console.log";

/// Errors of runtime directories.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The name has characters that do not belong in a path or hostname.
    #[error("bad VM name {0:?}: use 1-40 of [A-Za-z0-9_.-], not starting with '.' or '-'")]
    BadName(String),
    /// A VM of that name runs.
    #[error("a VM named {0} is already running")]
    InUse(String),
    /// No VM of that name runs.
    #[error("no VM named {0} is running (see skiff-run list)")]
    NotRunning(String),
    /// A directory or file could not be created, read or written.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
}

/// What `state.json` records about a running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// The VM's name.
    pub name: String,
    /// The skiff-run process that owns it.
    pub runner_pid: u32,
    /// skiff-vmm's pid.
    pub vmm_pid: u32,
    /// The bundle it runs.
    pub bundle: String,
    /// The kernel it booted.
    pub kernel: String,
    /// vCPUs.
    pub cpus: u8,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Seconds since the epoch at start.
    pub started: u64,
}

impl VmState {
    /// The state of a VM this process starts now (skiff-vmm's pid is set
    /// when it runs).
    pub fn starting(name: &str, bundle: &str, kernel: String, cpus: u8, memory_mib: u64) -> VmState {
        let started =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        VmState {
            name: name.to_string(),
            runner_pid: std::process::id(),
            vmm_pid: 0,
            bundle: bundle.to_string(),
            kernel,
            cpus,
            memory_mib,
            started,
        }
    }
}

/// Checks a VM name.
pub fn check_name(name: &str) -> Result<(), RuntimeError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && !name.starts_with(['.', '-'])
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::BadName(name.into()))
    }
}

/// A fresh name: `vm-` and 8 random hex digits.
pub fn random_name() -> String {
    let mut b = [0u8; 4];
    // SAFETY: the pointer and length describe `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b = (t.subsec_nanos() ^ std::process::id()).to_le_bytes();
    }
    format!("vm-{}", hex::encode(b))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The directory holding every VM's runtime directory: `$SKIFF_RUN_ROOT`,
/// `/run/skiff-run` as root, else `$XDG_RUNTIME_DIR/skiff-run`, else
/// `$TMPDIR/skiff-run-UID`.
pub fn default_root() -> PathBuf {
    if let Some(r) = std::env::var_os("SKIFF_RUN_ROOT") {
        return r.into();
    }
    if is_root() {
        return "/run/skiff-run".into();
    }
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(x).join("skiff-run");
    }
    // SAFETY: getuid has no preconditions.
    std::env::temp_dir().join(format!("skiff-run-{}", unsafe { libc::getuid() }))
}

fn writable_dir(dir: &Path) -> bool {
    if std::fs::create_dir_all(dir).is_err() {
        return false;
    }
    let probe = dir.join(format!(".probe.{}", std::process::id()));
    let ok = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// The cache for initramfs images and extracted kernels: `$SKIFF_CACHE_DIR`,
/// `/var/lib/skiff/run-cache` when writable, `$XDG_CACHE_HOME/skiff` or
/// `~/.cache/skiff`, else `$TMPDIR/skiff-cache-UID` (e.g. on a read-only /).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SKIFF_CACHE_DIR") {
        return d.into();
    }
    let mut candidates = vec![PathBuf::from("/var/lib/skiff/run-cache")];
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        candidates.push(PathBuf::from(x).join("skiff"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(h).join(".cache/skiff"));
    }
    candidates
        .into_iter()
        .find(|d| writable_dir(d))
        // SAFETY: getuid has no preconditions.
        .unwrap_or_else(|| std::env::temp_dir().join(format!("skiff-cache-{}", unsafe { libc::getuid() })))
}

/// Whether process `pid` exists.
pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid != 0 && unsafe { libc::kill(pid as i32, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// Reads a VM's state.
pub fn read_state(dir: &Path) -> Result<VmState, RuntimeError> {
    let path = dir.join(STATE_FILE);
    let data = std::fs::read(&path).map_err(|e| RuntimeError::Io(format!("reading {}", path.display()), e))?;
    serde_json::from_slice(&data)
        .map_err(|e| RuntimeError::Io(format!("parsing {}", path.display()), std::io::Error::other(e)))
}

/// Writes a VM's state (atomically).
pub fn write_state(dir: &Path, state: &VmState) -> Result<(), RuntimeError> {
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(".state.tmp");
    let data = serde_json::to_vec_pretty(state).unwrap_or_default();
    std::fs::write(&tmp, data)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| RuntimeError::Io(format!("writing {}", path.display()), e))
}

/// Creates `root/name` for a new VM. A directory left by a VM whose runner
/// is gone is removed first; one whose runner lives is [`RuntimeError::InUse`].
pub fn create(root: &Path, name: &str) -> Result<PathBuf, RuntimeError> {
    check_name(name)?;
    std::fs::create_dir_all(root).map_err(|e| RuntimeError::Io(format!("creating {}", root.display()), e))?;
    let dir = root.join(name);
    match std::fs::create_dir(&dir) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if read_state(&dir).is_ok_and(|s| alive(s.runner_pid)) {
                return Err(RuntimeError::InUse(name.into()));
            }
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).map_err(|e| RuntimeError::Io(format!("creating {}", dir.display()), e))?;
            Ok(dir)
        }
        Err(e) => Err(RuntimeError::Io(format!("creating {}", dir.display()), e)),
    }
}

/// The runtime directory of the running VM `name`.
pub fn find(root: &Path, name: &str) -> Result<(PathBuf, VmState), RuntimeError> {
    check_name(name)?;
    let dir = root.join(name);
    match read_state(&dir) {
        Ok(s) if alive(s.runner_pid) => Ok((dir, s)),
        _ => Err(RuntimeError::NotRunning(name.into())),
    }
}

/// Every running VM, by name. Directories of runners that are gone (killed
/// with SIGKILL) are removed on the way.
pub fn list(root: &Path) -> Vec<VmState> {
    let Ok(rd) = std::fs::read_dir(root) else { return Vec::new() };
    let mut out = Vec::new();
    for e in rd.filter_map(Result::ok) {
        let dir = e.path();
        match read_state(&dir) {
            Ok(s) if alive(s.runner_pid) => out.push(s),
            Ok(s) if !alive(s.vmm_pid) => {
                let _ = std::fs::remove_dir_all(&dir);
            }
            _ => {}
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Parses a signal: a number, or a name with or without `SIG`.
pub fn parse_signal(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    Some(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "WINCH" => libc::SIGWINCH,
        "ALRM" => libc::SIGALRM,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["web", "vm-1a2b", "a.b_c-d"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(41)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let n = random_name();
        assert!(check_name(&n).is_ok() && n.len() == 11, "{n}");
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("9"), Some(9));
        assert_eq!(parse_signal("TERM"), Some(libc::SIGTERM));
        assert_eq!(parse_signal("sigkill"), Some(libc::SIGKILL));
        assert_eq!(parse_signal("0"), None);
        assert_eq!(parse_signal("NOPE"), None);
    }

    #[test]
    fn create_find_list_and_stale_dirs() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let dir = create(r, "one").unwrap();
        let mut st = VmState {
            name: "one".into(),
            runner_pid: std::process::id(),
            vmm_pid: std::process::id(),
            bundle: "/b".into(),
            kernel: "k".into(),
            cpus: 1,
            memory_mib: 256,
            started: 0,
        };
        write_state(&dir, &st).unwrap();
        assert!(matches!(create(r, "one"), Err(RuntimeError::InUse(_))));
        assert_eq!(find(r, "one").unwrap().1, st);
        assert_eq!(list(r), vec![st.clone()]);
        assert!(matches!(find(r, "two"), Err(RuntimeError::NotRunning(_))));

        // A runner that is gone: not listed, its directory removed.
        st.runner_pid = 0x3fff_fff0;
        st.vmm_pid = 0x3fff_fff0;
        write_state(&dir, &st).unwrap();
        assert!(matches!(find(r, "one"), Err(RuntimeError::NotRunning(_))));
        assert!(list(r).is_empty());
        assert!(!dir.exists());
        create(r, "one").unwrap();
    }
}
