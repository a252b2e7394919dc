//! The thin VM's init sequence (the agent as PID 1), written against
//! [`Syscall`] so it is tested with a recording fake:
//!
//! 1. mount /proc, /sys, /dev, /dev/pts, /dev/shm, /run;
//! 2. load the kernel modules the initramfs carries for this kernel;
//! 3. read the main process's config.json from the initramfs, if any;
//! 4. mount the rootfs from virtio-fs tag `rootfs` and switch into it;
//! 5. hostname and /etc/resolv.conf from the kernel command line.
//!
//! Kernel command line keys: `skiff.rootfs=TAG` (`none`: stay in the
//! initramfs), `skiff.hostname=NAME`, `skiff.dns=IP[,IP...]`,
//! `skiff.config=PATH` (in the initramfs; default `/skiff/config.json`).

use std::path::{Path, PathBuf};

use skiff_agent_proto::{main_process_from_config, MainProcess, OciError};

use crate::sys::{SysError, Syscall};

/// Where the rootfs is mounted before switching into it.
pub const NEW_ROOT: &str = "/rootfs";
/// Default location of the main process's config in the initramfs.
pub const DEFAULT_CONFIG: &str = "/skiff/config.json";
/// `finit_module` flag: the file is compressed, the kernel decompresses.
const MODULE_INIT_COMPRESSED_FILE: i32 = 4;

/// Errors of the init sequence.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// An early filesystem could not be mounted.
    #[error("mounting {0}")]
    EarlyMount(String, #[source] SysError),
    /// The rootfs could not be mounted.
    #[error("mounting the rootfs from virtio-fs tag {0:?}")]
    Rootfs(String, #[source] SysError),
    /// Switching into the rootfs failed.
    #[error("switching root")]
    SwitchRoot(#[source] SysError),
    /// The main process's config is unreadable.
    #[error("reading {0}")]
    Config(String, #[source] OciError),
    /// Setting the hostname or writing resolv.conf failed.
    #[error("configuring the guest")]
    Configure(#[source] SysError),
}

/// Settings from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitConfig {
    /// virtio-fs tag of the rootfs; `None` to stay in the initramfs.
    pub rootfs_tag: Option<String>,
    /// Hostname to set.
    pub hostname: Option<String>,
    /// Name servers for /etc/resolv.conf.
    pub dns: Vec<String>,
    /// The main process's config.json in the initramfs.
    pub config: PathBuf,
}

/// Settings from the agent's own command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitOptions {
    /// Overrides the config.json location.
    pub config: Option<PathBuf>,
    /// Overrides the rootfs tag (`none`: stay in the initramfs).
    pub rootfs: Option<String>,
    /// Whether to load kernel modules.
    pub modules: bool,
}

impl Default for InitConfig {
    fn default() -> Self {
        InitConfig {
            rootfs_tag: Some("rootfs".into()),
            hostname: None,
            dns: Vec::new(),
            config: DEFAULT_CONFIG.into(),
        }
    }
}

/// Reads the `skiff.*` keys of a kernel command line.
pub fn parse_cmdline(cmdline: &str) -> InitConfig {
    let mut cfg = InitConfig::default();
    for word in cmdline.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "skiff.rootfs" => cfg.rootfs_tag = (value != "none").then(|| value.to_string()),
            "skiff.hostname" => cfg.hostname = Some(value.to_string()).filter(|v| !v.is_empty()),
            "skiff.dns" => {
                cfg.dns = value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            }
            "skiff.config" => cfg.config = value.into(),
            _ => {}
        }
    }
    cfg
}

struct EarlyMount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: libc::c_ulong,
    data: &'static str,
}

const EARLY_MOUNTS: &[EarlyMount] = &[
    EarlyMount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    EarlyMount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    EarlyMount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: "mode=0755",
    },
    EarlyMount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "mode=0620,gid=5,ptmxmode=0666",
    },
    EarlyMount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
    EarlyMount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=0755",
    },
];
const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
/// The early mounts that move into the new root (the others are below).
const MOVED: &[&str] = &["/dev", "/proc", "/sys", "/run"];

/// Mounts the early filesystems; one already mounted (EBUSY, e.g. a
/// kernel-mounted devtmpfs) is fine.
pub fn early_mounts(sys: &dyn Syscall) -> Result<(), InitError> {
    for m in EARLY_MOUNTS {
        let target = Path::new(m.target);
        sys.mkdir_all(target)
            .map_err(|e| InitError::EarlyMount(m.target.into(), e))?;
        match sys.mount(m.source, target, m.fstype, m.flags, m.data) {
            Err(e) if e.errno() != Some(libc::EBUSY) => {
                return Err(InitError::EarlyMount(m.target.into(), e))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Loads the kernel modules under `/lib/modules/<release>`: in the order
/// of its `modules.load` if there is one, otherwise all of them, in passes
/// until a pass loads nothing new (so dependencies sort themselves out).
/// Parameters come from the kernel command line (`name.param=value`), as
/// modprobe would pass them. Returns the modules that could not be loaded.
pub fn load_modules(sys: &dyn Syscall, cmdline: &str) -> Vec<PathBuf> {
    let Ok(release) = sys.kernel_release() else {
        return Vec::new();
    };
    let dir = Path::new("/lib/modules").join(release);
    let mut pending: Vec<PathBuf> = match sys.read_file(&dir.join("modules.load")) {
        Ok(list) => String::from_utf8_lossy(&list)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| dir.join(l))
            .collect(),
        Err(_) => {
            let mut found = Vec::new();
            find_modules(sys, &dir, &mut found);
            found
        }
    };
    loop {
        let before = pending.len();
        pending.retain(|m| {
            let compressed = [".xz", ".zst", ".gz"]
                .iter()
                .any(|s| m.to_string_lossy().ends_with(s));
            let flags = if compressed {
                MODULE_INIT_COMPRESSED_FILE
            } else {
                0
            };
            match sys.load_module(m, &module_params(cmdline, m), flags) {
                Ok(()) => false,
                Err(e) => e.errno() != Some(libc::EEXIST),
            }
        });
        if pending.is_empty() || pending.len() == before {
            return pending;
        }
    }
}

/// The kernel command line's parameters for the module in file `path`.
pub fn module_params(cmdline: &str, path: &Path) -> String {
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = file
        .split(".ko")
        .next()
        .unwrap_or_default()
        .replace('-', "_");
    cmdline
        .split_whitespace()
        .filter_map(|w| {
            let (module, param) = w.split_once('.')?;
            (module.replace('-', "_") == name && !param.is_empty()).then_some(param)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn find_modules(sys: &dyn Syscall, dir: &Path, out: &mut Vec<PathBuf>) {
    for p in sys.read_dir(dir).unwrap_or_default() {
        if sys.is_dir(&p) {
            find_modules(sys, &p, out);
        } else if p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains(".ko"))
        {
            out.push(p);
        }
    }
}

/// Makes `new_root` the root: moves the early mounts into it, then
/// `pivot_root(".", ".")` and a lazy unmount of the old root; the
/// initramfs's rootfs cannot be pivoted (EINVAL), so there it falls back
/// to what switch_root(8) does: move the new root onto `/` and chroot.
pub fn switch_root(sys: &dyn Syscall, new_root: &Path) -> Result<(), InitError> {
    for m in MOVED {
        let target = new_root.join(m.trim_start_matches('/'));
        sys.mkdir_all(&target).map_err(InitError::SwitchRoot)?;
        sys.mount(m, &target, "", libc::MS_MOVE, "")
            .map_err(InitError::SwitchRoot)?;
    }
    sys.chdir(new_root).map_err(InitError::SwitchRoot)?;
    match sys.pivot_root(Path::new("."), Path::new(".")) {
        Ok(()) => {
            sys.umount(Path::new("."), libc::MNT_DETACH)
                .map_err(InitError::SwitchRoot)?;
        }
        Err(e) if e.errno() == Some(libc::EINVAL) => {
            sys.mount(".", Path::new("/"), "", libc::MS_MOVE, "")
                .map_err(InitError::SwitchRoot)?;
            sys.chroot(Path::new(".")).map_err(InitError::SwitchRoot)?;
        }
        Err(e) => return Err(InitError::SwitchRoot(e)),
    }
    sys.chdir(Path::new("/")).map_err(InitError::SwitchRoot)
}

/// Runs the init sequence (the kernel command line is read once /proc is
/// mounted); returns the main process from the initramfs's
/// config.json, if it has one. Module load failures are logged, not fatal.
pub fn run(sys: &dyn Syscall, opts: &InitOptions) -> Result<Option<MainProcess>, InitError> {
    early_mounts(sys)?;
    let cmdline = sys
        .read_file(Path::new("/proc/cmdline"))
        .unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).into_owned();
    let mut cfg = parse_cmdline(&cmdline);
    if let Some(c) = &opts.config {
        cfg.config = c.clone();
    }
    if let Some(tag) = &opts.rootfs {
        cfg.rootfs_tag = (tag != "none").then(|| tag.clone());
    }
    if opts.modules {
        let failed = load_modules(sys, &cmdline);
        eprintln!(
            "skiff-agent: kernel modules loaded, {} failed",
            failed.len()
        );
        for m in failed {
            eprintln!("skiff-agent: could not load module {}", m.display());
        }
    }
    let config_name = cfg.config.display().to_string();
    let main = match sys.read_file(&cfg.config) {
        Ok(json) => {
            Some(main_process_from_config(&json).map_err(|e| InitError::Config(config_name, e))?)
        }
        Err(_) => None,
    };
    if let Some(tag) = &cfg.rootfs_tag {
        let new_root = Path::new(NEW_ROOT);
        sys.mkdir_all(new_root)
            .map_err(|e| InitError::Rootfs(tag.clone(), e))?;
        sys.mount(tag, new_root, "virtiofs", 0, "")
            .map_err(|e| InitError::Rootfs(tag.clone(), e))?;
        switch_root(sys, new_root)?;
    }
    let hostname = cfg
        .hostname
        .clone()
        .or_else(|| main.as_ref().and_then(|m| m.hostname.clone()));
    if let Some(h) = hostname {
        sys.sethostname(&h).map_err(InitError::Configure)?;
    }
    if !cfg.dns.is_empty() {
        sys.mkdir_all(Path::new("/etc"))
            .map_err(InitError::Configure)?;
        let resolv = crate::network::render_resolv(&cfg.dns, &[]);
        sys.write_file(Path::new("/etc/resolv.conf"), resolv.as_bytes())
            .map_err(InitError::Configure)?;
    }
    Ok(main)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::{Call, Recording};

    const OPTS: InitOptions = InitOptions {
        config: None,
        rootfs: None,
        modules: true,
    };

    fn mounts(calls: &[Call]) -> Vec<(String, String, String)> {
        calls
            .iter()
            .filter_map(|c| match c {
                Call::Mount {
                    source,
                    target,
                    fstype,
                    ..
                } => Some((source.clone(), target.clone(), fstype.clone())),
                _ => None,
            })
            .collect()
    }

    fn t(a: &str, b: &str, c: &str) -> (String, String, String) {
        (a.into(), b.into(), c.into())
    }

    #[test]
    fn cmdline_keys() {
        let c = parse_cmdline(
            "console=ttyS0 skiff.rootfs=root2 skiff.hostname=web skiff.dns=10.0.0.1,1.1.1.1 quiet",
        );
        assert_eq!(c.rootfs_tag.as_deref(), Some("root2"));
        assert_eq!(c.hostname.as_deref(), Some("web"));
        assert_eq!(c.dns, ["10.0.0.1", "1.1.1.1"]);
        assert_eq!(parse_cmdline("skiff.rootfs=none").rootfs_tag, None);
        assert_eq!(parse_cmdline(""), InitConfig::default());
    }

    #[test]
    fn full_sequence_on_initramfs_falls_back_to_move_and_chroot() {
        let sys = Recording::new();
        sys.fail
            .lock()
            .unwrap()
            .insert("pivot_root".into(), libc::EINVAL);
        sys.file("/lib/modules/6.1.0-test/kernel/virtio_fs.ko", b"");
        sys.file(
            "/skiff/config.json",
            br#"{"process":{"args":["nginx"]},"hostname":"web"}"#,
        );
        sys.file("/proc/cmdline", b"console=ttyS0 skiff.dns=10.0.0.1\n");
        let main = run(&sys, &OPTS).unwrap().unwrap();
        assert_eq!(main.args, ["nginx"]);
        let calls = sys.calls();
        assert_eq!(
            mounts(&calls),
            [
                t("proc", "/proc", "proc"),
                t("sysfs", "/sys", "sysfs"),
                t("devtmpfs", "/dev", "devtmpfs"),
                t("devpts", "/dev/pts", "devpts"),
                t("shm", "/dev/shm", "tmpfs"),
                t("tmpfs", "/run", "tmpfs"),
                t("rootfs", "/rootfs", "virtiofs"),
                t("/dev", "/rootfs/dev", ""),
                t("/proc", "/rootfs/proc", ""),
                t("/sys", "/rootfs/sys", ""),
                t("/run", "/rootfs/run", ""),
                t(".", "/", ""),
            ]
        );
        let module = calls.iter().position(|c| {
            *c == Call::LoadModule(
                "/lib/modules/6.1.0-test/kernel/virtio_fs.ko".into(),
                String::new(),
            )
        });
        let rootfs = calls
            .iter()
            .position(|c| matches!(c, Call::Mount { fstype, .. } if fstype == "virtiofs"));
        assert!(
            module.unwrap() < rootfs.unwrap(),
            "modules load before the rootfs mount"
        );
        let tail: Vec<Call> = calls
            .iter()
            .skip_while(|c| !matches!(c, Call::PivotRoot(..)))
            .cloned()
            .collect();
        assert_eq!(
            tail,
            [
                Call::PivotRoot(".".into(), ".".into()),
                Call::Mount {
                    source: ".".into(),
                    target: "/".into(),
                    fstype: String::new(),
                    flags: libc::MS_MOVE,
                    data: String::new()
                },
                Call::Chroot(".".into()),
                Call::Chdir("/".into()),
                Call::Hostname("web".into()),
                Call::Mkdir("/etc".into()),
                Call::Write(
                    "/etc/resolv.conf".into(),
                    "# written by skiff-agent\nnameserver 10.0.0.1\n".into()
                ),
            ]
        );
    }

    #[test]
    fn pivot_root_when_possible() {
        let sys = Recording::new();
        switch_root(&sys, Path::new("/rootfs")).unwrap();
        let calls = sys.calls();
        let tail = &calls[calls.len() - 4..];
        assert_eq!(
            tail,
            [
                Call::Chdir("/rootfs".into()),
                Call::PivotRoot(".".into(), ".".into()),
                Call::Umount(".".into()),
                Call::Chdir("/".into())
            ]
        );
    }

    #[test]
    fn missing_rootfs_tag_is_an_error_and_already_mounted_dev_is_not() {
        let sys = Recording::new();
        sys.fail
            .lock()
            .unwrap()
            .insert("mount:/dev".into(), libc::EBUSY);
        sys.fail
            .lock()
            .unwrap()
            .insert("mount:/rootfs".into(), libc::ENOENT);
        let err = run(&sys, &OPTS).unwrap_err();
        assert!(
            matches!(err, InitError::Rootfs(ref tag, _) if tag == "rootfs"),
            "{err}"
        );
    }

    #[test]
    fn modules_load_in_passes_until_dependencies_resolve() {
        let sys = Recording::new();
        sys.file("/lib/modules/6.1.0-test/a_needs_b.ko", b"");
        sys.file("/lib/modules/6.1.0-test/b.ko.xz", b"");
        sys.file("/lib/modules/6.1.0-test/broken.ko", b"");
        // a fails until b is in: simulate with a one-shot failure.
        sys.fail.lock().unwrap().insert(
            "load_module:/lib/modules/6.1.0-test/broken.ko".into(),
            libc::ENOEXEC,
        );
        let failed = load_modules(&sys, "");
        assert_eq!(failed, [PathBuf::from("/lib/modules/6.1.0-test/broken.ko")]);
        let loads = sys
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::LoadModule(..)))
            .count();
        assert_eq!(
            loads, 4,
            "one pass of three, a second pass retrying only the failure"
        );
    }

    #[test]
    fn module_parameters_come_from_the_cmdline() {
        let cmdline = "quiet virtio_mmio.device=4K@0xd0000000:5 virtio-mmio.x=1 vsock.y virtio.z=2";
        let p = |f: &str| module_params(cmdline, Path::new(f));
        assert_eq!(
            p("/lib/modules/k/virtio_mmio.ko"),
            "device=4K@0xd0000000:5 x=1"
        );
        assert_eq!(p("/lib/modules/k/vsock.ko.xz"), "y");
        assert_eq!(p("/lib/modules/k/virtio_ring.ko"), "");
    }

    #[test]
    fn modules_load_follows_modules_load_order() {
        let sys = Recording::new();
        sys.file(
            "/lib/modules/6.1.0-test/modules.load",
            b"kernel/virtio.ko\n# comment\nkernel/virtio_fs.ko\n",
        );
        assert!(load_modules(&sys, "").is_empty());
        let loads: Vec<Call> = sys
            .calls()
            .into_iter()
            .filter(|c| matches!(c, Call::LoadModule(..)))
            .collect();
        assert_eq!(
            loads,
            [
                Call::LoadModule(
                    "/lib/modules/6.1.0-test/kernel/virtio.ko".into(),
                    String::new()
                ),
                Call::LoadModule(
                    "/lib/modules/6.1.0-test/kernel/virtio_fs.ko".into(),
                    String::new()
                )
            ]
        );
    }
}
