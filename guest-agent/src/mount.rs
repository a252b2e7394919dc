//! Mount and unmount requests (virtio-fs tags, block devices, binds).

use std::path::Path;

use skiff_agent_proto::{ErrorCode, MountRequest, UnmountRequest};

use crate::sys::{SysError, Syscall};

/// Errors of mount requests.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The target is not an absolute path.
    #[error("mount target {0:?} is not absolute")]
    Relative(String),
    /// The target directory could not be created.
    #[error("creating the mount point")]
    Mkdir(#[source] SysError),
    /// mount(2) failed.
    #[error("mounting {source_name} on {target}")]
    Mount {
        /// The source.
        source_name: String,
        /// The target.
        target: String,
        /// The cause.
        #[source]
        source: SysError,
    },
    /// umount2(2) failed.
    #[error("unmounting")]
    Umount(#[source] SysError),
}

impl MountError {
    /// The protocol's error code for this error.
    pub fn code(&self) -> ErrorCode {
        let errno = match self {
            MountError::Relative(_) => return ErrorCode::BadRequest,
            MountError::Mkdir(e) | MountError::Mount { source: e, .. } | MountError::Umount(e) => {
                e.errno()
            }
        };
        match errno {
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => ErrorCode::NotFound,
            Some(libc::EPERM) | Some(libc::EACCES) => ErrorCode::PermissionDenied,
            _ => ErrorCode::Io,
        }
    }
}

/// Splits mount(8)-style options into mount flags and filesystem data.
pub fn parse_options(options: &[String]) -> (libc::c_ulong, String) {
    let mut flags: libc::c_ulong = 0;
    let mut data = Vec::new();
    for o in options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        let (set, clear): (libc::c_ulong, libc::c_ulong) = match o {
            "defaults" | "rw" => (0, libc::MS_RDONLY),
            "ro" => (libc::MS_RDONLY, 0),
            "nosuid" => (libc::MS_NOSUID, 0),
            "suid" => (0, libc::MS_NOSUID),
            "nodev" => (libc::MS_NODEV, 0),
            "dev" => (0, libc::MS_NODEV),
            "noexec" => (libc::MS_NOEXEC, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "dirsync" => (libc::MS_DIRSYNC, 0),
            "remount" => (libc::MS_REMOUNT, 0),
            "noatime" => (libc::MS_NOATIME, 0),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "relatime" => (libc::MS_RELATIME, 0),
            "strictatime" => (libc::MS_STRICTATIME, 0),
            "bind" => (libc::MS_BIND, 0),
            "rbind" => (libc::MS_BIND | libc::MS_REC, 0),
            other => {
                data.push(other);
                continue;
            }
        };
        flags = (flags | set) & !clear;
    }
    (flags, data.join(","))
}

/// Serves a mount request: creates the target, then mounts.
pub fn mount(sys: &dyn Syscall, req: &MountRequest) -> Result<(), MountError> {
    if !req.target.starts_with('/') {
        return Err(MountError::Relative(req.target.clone()));
    }
    let target = Path::new(&req.target);
    sys.mkdir_all(target).map_err(MountError::Mkdir)?;
    let (flags, data) = parse_options(&req.options);
    sys.mount(&req.source, target, &req.fstype, flags, &data)
        .map_err(|source| MountError::Mount {
            source_name: req.source.clone(),
            target: req.target.clone(),
            source,
        })
}

/// Serves an unmount request.
pub fn unmount(sys: &dyn Syscall, req: &UnmountRequest) -> Result<(), MountError> {
    if !req.target.starts_with('/') {
        return Err(MountError::Relative(req.target.clone()));
    }
    let flags = if req.lazy { libc::MNT_DETACH } else { 0 };
    sys.umount(Path::new(&req.target), flags)
        .map_err(MountError::Umount)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::{Call, Recording};

    #[test]
    fn options_split_into_flags_and_data() {
        let o = |v: &[&str]| parse_options(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(o(&[]), (0, String::new()));
        assert_eq!(
            o(&["ro", "nosuid"]),
            ((libc::MS_RDONLY | libc::MS_NOSUID), String::new())
        );
        assert_eq!(o(&["ro,rw"]), (0, String::new()));
        assert_eq!(
            o(&["rbind"]),
            ((libc::MS_BIND | libc::MS_REC), String::new())
        );
        assert_eq!(
            o(&["noexec", "dax=always", "cache=none"]),
            (libc::MS_NOEXEC, "dax=always,cache=none".into())
        );
    }

    #[test]
    fn mounts_a_virtiofs_tag_after_creating_the_target() {
        let sys = Recording::new();
        let req = MountRequest {
            source: "data".into(),
            target: "/mnt/data".into(),
            fstype: "virtiofs".into(),
            options: vec!["ro".into()],
        };
        mount(&sys, &req).unwrap();
        assert_eq!(
            sys.calls(),
            [
                Call::Mkdir("/mnt/data".into()),
                Call::Mount {
                    source: "data".into(),
                    target: "/mnt/data".into(),
                    fstype: "virtiofs".into(),
                    flags: libc::MS_RDONLY,
                    data: String::new()
                }
            ]
        );
    }

    #[test]
    fn mount_errors_map_to_codes() {
        let sys = Recording::new();
        sys.fail
            .lock()
            .unwrap()
            .insert("mount".into(), libc::ENOENT);
        let req = MountRequest {
            source: "nope".into(),
            target: "/m".into(),
            fstype: "virtiofs".into(),
            options: vec![],
        };
        let e = mount(&sys, &req).unwrap_err();
        assert_eq!(e.code(), ErrorCode::NotFound);
        let rel = MountRequest {
            target: "m".into(),
            ..req
        };
        assert_eq!(mount(&sys, &rel).unwrap_err().code(), ErrorCode::BadRequest);
    }
}
