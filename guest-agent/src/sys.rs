//! The operating system as the init sequence sees it, behind a trait so
//! the sequence is tested with [`fake::Recording`] instead of a VM.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A failed system call.
#[derive(Debug, thiserror::Error)]
#[error("{call} {arg}")]
pub struct SysError {
    /// Which call.
    pub call: &'static str,
    /// Its main argument, for the message.
    pub arg: String,
    /// The cause.
    #[source]
    pub source: io::Error,
}

impl SysError {
    /// The errno, if any.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// What the init sequence needs from the OS.
pub trait Syscall: Send + Sync {
    /// `mkdir -p`.
    fn mkdir_all(&self, path: &Path) -> Result<(), SysError>;
    /// mount(2); empty `source`, `fstype` or `data` pass NULL.
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: u64,
        data: &str,
    ) -> Result<(), SysError>;
    /// umount2(2).
    fn umount(&self, target: &Path, flags: i32) -> Result<(), SysError>;
    /// pivot_root(2).
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> Result<(), SysError>;
    /// chroot(2).
    fn chroot(&self, path: &Path) -> Result<(), SysError>;
    /// chdir(2).
    fn chdir(&self, path: &Path) -> Result<(), SysError>;
    /// sethostname(2).
    fn sethostname(&self, name: &str) -> Result<(), SysError>;
    /// finit_module(2) on the file at `path` with module parameters.
    fn load_module(&self, path: &Path, params: &str, flags: i32) -> Result<(), SysError>;
    /// Reads a whole (small) file.
    fn read_file(&self, path: &Path) -> Result<Vec<u8>, SysError>;
    /// Writes a whole (small) file.
    fn write_file(&self, path: &Path, data: &[u8]) -> Result<(), SysError>;
    /// Lists a directory's entries (full paths), sorted.
    fn read_dir(&self, path: &Path) -> Result<Vec<PathBuf>, SysError>;
    /// Whether `path` is a directory.
    fn is_dir(&self, path: &Path) -> bool;
    /// The kernel release (`uname -r`).
    fn kernel_release(&self) -> Result<String, SysError>;
    /// kill(2).
    fn kill(&self, pid: i32, signal: i32) -> Result<(), SysError>;
    /// sync(2).
    fn sync(&self);
    /// reboot(2) with `LINUX_REBOOT_CMD_*`; returns only on failure.
    fn reboot(&self, cmd: i32) -> Result<(), SysError>;
    /// clock_settime(2) of `CLOCK_REALTIME`, in nanoseconds since the epoch.
    fn set_realtime(&self, unix_ns: u64) -> Result<(), SysError>;
}

fn err(call: &'static str, arg: impl std::fmt::Debug) -> SysError {
    SysError {
        call,
        arg: format!("{arg:?}"),
        source: io::Error::last_os_error(),
    }
}

fn cstr(call: &'static str, s: &[u8]) -> Result<CString, SysError> {
    CString::new(s).map_err(|_| SysError {
        call,
        arg: String::from_utf8_lossy(s).into_owned(),
        source: io::ErrorKind::InvalidInput.into(),
    })
}

fn check(call: &'static str, arg: impl std::fmt::Debug, r: libc::c_long) -> Result<(), SysError> {
    if r < 0 {
        Err(err(call, arg))
    } else {
        Ok(())
    }
}

/// The real thing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Linux;

impl Syscall for Linux {
    fn mkdir_all(&self, path: &Path) -> Result<(), SysError> {
        std::fs::create_dir_all(path).map_err(|source| SysError {
            call: "mkdir",
            arg: format!("{path:?}"),
            source,
        })
    }

    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: u64,
        data: &str,
    ) -> Result<(), SysError> {
        let src = cstr("mount", source.as_bytes())?;
        let tgt = cstr("mount", target.as_os_str().as_bytes())?;
        let fst = cstr("mount", fstype.as_bytes())?;
        let dat = cstr("mount", data.as_bytes())?;
        let opt = |c: &CString, s: &str| {
            if s.is_empty() {
                std::ptr::null()
            } else {
                c.as_ptr()
            }
        };
        // SAFETY: every pointer is NULL or a NUL-terminated string that
        // outlives the call.
        let r = unsafe {
            libc::mount(
                opt(&src, source),
                tgt.as_ptr(),
                opt(&fst, fstype),
                flags,
                opt(&dat, data) as *const libc::c_void,
            )
        };
        check("mount", target, r.into())
    }

    fn umount(&self, target: &Path, flags: i32) -> Result<(), SysError> {
        let t = cstr("umount", target.as_os_str().as_bytes())?;
        // SAFETY: `t` is a NUL-terminated string that outlives the call.
        let r = unsafe { libc::umount2(t.as_ptr(), flags) };
        check("umount", target, r.into())
    }

    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> Result<(), SysError> {
        let n = cstr("pivot_root", new_root.as_os_str().as_bytes())?;
        let o = cstr("pivot_root", put_old.as_os_str().as_bytes())?;
        // SAFETY: both are NUL-terminated strings that outlive the call.
        let r = unsafe { libc::syscall(libc::SYS_pivot_root, n.as_ptr(), o.as_ptr()) };
        check("pivot_root", new_root, r)
    }

    fn chroot(&self, path: &Path) -> Result<(), SysError> {
        let p = cstr("chroot", path.as_os_str().as_bytes())?;
        // SAFETY: `p` is a NUL-terminated string that outlives the call.
        let r = unsafe { libc::chroot(p.as_ptr()) };
        check("chroot", path, r.into())
    }

    fn chdir(&self, path: &Path) -> Result<(), SysError> {
        std::env::set_current_dir(path).map_err(|source| SysError {
            call: "chdir",
            arg: format!("{path:?}"),
            source,
        })
    }

    fn sethostname(&self, name: &str) -> Result<(), SysError> {
        // SAFETY: the pointer and length describe `name`'s bytes.
        let r = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
        check("sethostname", name, r.into())
    }

    fn load_module(&self, path: &Path, params: &str, flags: i32) -> Result<(), SysError> {
        let params = cstr("finit_module", params.as_bytes())?;
        let f = std::fs::File::open(path).map_err(|source| SysError {
            call: "open",
            arg: format!("{path:?}"),
            source,
        })?;
        // SAFETY: the fd is open for the whole call, `params` is a
        // NUL-terminated string that outlives it.
        let r = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                params.as_ptr(),
                flags,
            )
        };
        check("finit_module", path, r)
    }

    fn read_file(&self, path: &Path) -> Result<Vec<u8>, SysError> {
        std::fs::read(path).map_err(|source| SysError {
            call: "read",
            arg: format!("{path:?}"),
            source,
        })
    }

    fn write_file(&self, path: &Path, data: &[u8]) -> Result<(), SysError> {
        std::fs::write(path, data).map_err(|source| SysError {
            call: "write",
            arg: format!("{path:?}"),
            source,
        })
    }

    fn read_dir(&self, path: &Path) -> Result<Vec<PathBuf>, SysError> {
        let rd = std::fs::read_dir(path).map_err(|source| SysError {
            call: "readdir",
            arg: format!("{path:?}"),
            source,
        })?;
        let mut out: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        out.sort();
        Ok(out)
    }

    fn is_dir(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
    }

    fn kernel_release(&self) -> Result<String, SysError> {
        // SAFETY: utsname is plain data; all-zero is valid.
        let mut u: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: uname writes only into `u`.
        let r = unsafe { libc::uname(&mut u) };
        check("uname", "", r.into())?;
        // SAFETY: uname NUL-terminates `release` within the array.
        let rel = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
        Ok(rel.to_string_lossy().into_owned())
    }

    fn kill(&self, pid: i32, signal: i32) -> Result<(), SysError> {
        // SAFETY: plain syscall with integer arguments.
        let r = unsafe { libc::kill(pid, signal) };
        check("kill", pid, r.into())
    }

    fn sync(&self) {
        // SAFETY: plain syscall without arguments.
        unsafe { libc::sync() };
    }

    fn reboot(&self, cmd: i32) -> Result<(), SysError> {
        // SAFETY: plain syscall with an integer argument.
        let r = unsafe { libc::reboot(cmd) };
        check("reboot", cmd, r.into())
    }

    fn set_realtime(&self, unix_ns: u64) -> Result<(), SysError> {
        let ts = libc::timespec {
            tv_sec: (unix_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: `ts` is a valid timespec read during the call.
        let r = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
        check("clock_settime", unix_ns, r.into())
    }
}

/// A recording fake for tests.
#[cfg(test)]
pub mod fake {
    use super::*;
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Mutex;

    /// One recorded call.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        Mkdir(String),
        Mount {
            source: String,
            target: String,
            fstype: String,
            flags: u64,
            data: String,
        },
        Umount(String),
        PivotRoot(String, String),
        Chroot(String),
        Chdir(String),
        Hostname(String),
        LoadModule(String, String),
        Write(String, String),
        Kill(i32, i32),
        Sync,
        Reboot(i32),
        SetTime(u64),
    }

    /// Records calls; serves files from a map; fails calls by name.
    #[derive(Debug, Default)]
    pub struct Recording {
        pub calls: Mutex<Vec<Call>>,
        pub files: Mutex<BTreeMap<PathBuf, Vec<u8>>>,
        /// call name (e.g. "pivot_root", or "load_module:/path") → errno.
        pub fail: Mutex<HashMap<String, i32>>,
        pub release: String,
    }

    impl Recording {
        pub fn new() -> Self {
            Recording {
                release: "6.1.0-test".into(),
                ..Default::default()
            }
        }
        pub fn file(&self, path: &str, data: &[u8]) {
            self.files
                .lock()
                .unwrap()
                .insert(path.into(), data.to_vec());
        }
        pub fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }
        fn rec(&self, key: &str, call: Call) -> Result<(), SysError> {
            self.calls.lock().unwrap().push(call);
            let fail = self.fail.lock().unwrap();
            let name = key.split(':').next().unwrap_or(key);
            match fail.get(key).or_else(|| fail.get(name)) {
                Some(&errno) => Err(SysError {
                    call: "fake",
                    arg: key.into(),
                    source: io::Error::from_raw_os_error(errno),
                }),
                None => Ok(()),
            }
        }
    }

    fn s(p: &Path) -> String {
        p.to_string_lossy().into_owned()
    }

    impl Syscall for Recording {
        fn mkdir_all(&self, path: &Path) -> Result<(), SysError> {
            self.rec("mkdir", Call::Mkdir(s(path)))
        }
        fn mount(
            &self,
            source: &str,
            target: &Path,
            fstype: &str,
            flags: u64,
            data: &str,
        ) -> Result<(), SysError> {
            let c = Call::Mount {
                source: source.into(),
                target: s(target),
                fstype: fstype.into(),
                flags,
                data: data.into(),
            };
            self.rec(&format!("mount:{}", s(target)), c)
        }
        fn umount(&self, target: &Path, _flags: i32) -> Result<(), SysError> {
            self.rec("umount", Call::Umount(s(target)))
        }
        fn pivot_root(&self, new_root: &Path, put_old: &Path) -> Result<(), SysError> {
            self.rec("pivot_root", Call::PivotRoot(s(new_root), s(put_old)))
        }
        fn chroot(&self, path: &Path) -> Result<(), SysError> {
            self.rec("chroot", Call::Chroot(s(path)))
        }
        fn chdir(&self, path: &Path) -> Result<(), SysError> {
            self.rec("chdir", Call::Chdir(s(path)))
        }
        fn sethostname(&self, name: &str) -> Result<(), SysError> {
            self.rec("sethostname", Call::Hostname(name.into()))
        }
        fn load_module(&self, path: &Path, params: &str, _flags: i32) -> Result<(), SysError> {
            self.rec(
                &format!("load_module:{}", s(path)),
                Call::LoadModule(s(path), params.into()),
            )
        }
        fn read_file(&self, path: &Path) -> Result<Vec<u8>, SysError> {
            self.files
                .lock()
                .unwrap()
                .get(path)
                .cloned()
                .ok_or_else(|| SysError {
                    call: "read",
                    arg: s(path),
                    source: io::ErrorKind::NotFound.into(),
                })
        }
        fn write_file(&self, path: &Path, data: &[u8]) -> Result<(), SysError> {
            self.files
                .lock()
                .unwrap()
                .insert(path.into(), data.to_vec());
            self.rec(
                "write",
                Call::Write(s(path), String::from_utf8_lossy(data).into_owned()),
            )
        }
        fn read_dir(&self, path: &Path) -> Result<Vec<PathBuf>, SysError> {
            let files = self.files.lock().unwrap();
            let mut out: Vec<PathBuf> = files
                .keys()
                .filter_map(|k| {
                    k.strip_prefix(path)
                        .ok()?
                        .components()
                        .next()
                        .map(|c| path.join(c))
                })
                .collect();
            out.dedup();
            Ok(out)
        }
        fn is_dir(&self, path: &Path) -> bool {
            let files = self.files.lock().unwrap();
            files.keys().any(|k| k != path && k.starts_with(path))
        }
        fn kernel_release(&self) -> Result<String, SysError> {
            Ok(self.release.clone())
        }
        fn kill(&self, pid: i32, signal: i32) -> Result<(), SysError> {
            self.rec("kill", Call::Kill(pid, signal))
        }
        fn sync(&self) {
            let _ = self.rec("sync", Call::Sync);
        }
        fn reboot(&self, cmd: i32) -> Result<(), SysError> {
            self.rec("reboot", Call::Reboot(cmd))
        }
        fn set_realtime(&self, unix_ns: u64) -> Result<(), SysError> {
            self.rec("clock_settime", Call::SetTime(unix_ns))
        }
    }
}
