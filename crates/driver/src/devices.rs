//! Instance devices (Incus's `devices:` map) a VM gets beyond its root disk
//! and NIC:
//!
//! | device | keys | the VM gets |
//! |---|---|---|
//! | `disk` | `source=DIR`, `path=/in/guest`, `readonly=true` | a virtio-fs share mounted at `path` by the agent |
//! | `disk` | `source=FILE or block device`, `readonly=true` | a virtio-blk disk, `/dev/disk/by-id/virtio-NAME` |
//!
//! The root disk (`path=/`) and the NIC are the daemon's. Devices are
//! added before the main process starts and can be added and removed while
//! the VM runs (hot-plug).

use std::collections::BTreeMap;
use std::path::PathBuf;

use skiff_run::monitor::DeviceSpec;

/// Why a device cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("device {name}: {why}")]
    Bad { name: String, why: String },
}

fn bad(name: &str, why: impl Into<String>) -> DeviceError {
    DeviceError::Bad { name: name.into(), why: why.into() }
}

/// Whether `dev` is one the daemon handles itself (root disk, NIC).
pub fn is_builtin(dev: &BTreeMap<String, String>) -> bool {
    match dev.get("type").map(String::as_str) {
        Some("nic") => true,
        Some("disk") => dev.get("path").is_some_and(|p| p == "/"),
        _ => false,
    }
}

/// A disk device's keys, checked alike for every kind of instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The host path (absolute, existing).
    pub source: PathBuf,
    /// Whether `source` is a directory.
    pub is_dir: bool,
    /// Where it appears inside, if given.
    pub path: Option<String>,
    /// Read-only.
    pub readonly: bool,
}

/// The keys of disk device `name`; `None` for the daemon's own devices.
/// `takes` names the instances in errors ("VMs", "containers").
pub fn disk(name: &str, dev: &BTreeMap<String, String>, takes: &str) -> Result<Option<Disk>, DeviceError> {
    if is_builtin(dev) {
        return Ok(None);
    }
    match dev.get("type").map(String::as_str) {
        Some("disk") => {}
        Some(t) => return Err(bad(name, format!("type {t:?}: {takes} take disk devices (and the managed nic)"))),
        None => return Err(bad(name, "no type")),
    }
    if let Some(k) = dev.keys().find(|k| !["type", "source", "path", "readonly"].contains(&k.as_str())) {
        return Err(bad(name, format!("unknown key {k:?} (disk devices take source, path and readonly)")));
    }
    let readonly = match dev.get("readonly").map(String::as_str) {
        None | Some("false") | Some("0") | Some("no") => false,
        Some("true") | Some("1") | Some("yes") => true,
        Some(v) => return Err(bad(name, format!("readonly={v:?}: expected true or false"))),
    };
    let source = PathBuf::from(dev.get("source").ok_or_else(|| bad(name, "no source (a host path)"))?);
    if !source.is_absolute() {
        return Err(bad(name, format!("source {} is not an absolute host path", source.display())));
    }
    let meta = std::fs::metadata(&source).map_err(|e| bad(name, format!("source {}: {e}", source.display())))?;
    Ok(Some(Disk { source, is_dir: meta.is_dir(), path: dev.get("path").cloned(), readonly }))
}

/// What device `name` becomes in the VM; `None` for the daemon's own.
pub fn device_spec(name: &str, dev: &BTreeMap<String, String>) -> Result<Option<DeviceSpec>, DeviceError> {
    if is_builtin(dev) {
        return Ok(None);
    }
    if !skiff_run::vm::valid_device_name(name) {
        return Err(bad(name, "names are 1-32 characters of a-z, A-Z, 0-9, '-' and '_'"));
    }
    let Some(Disk { source, is_dir, path, readonly }) = disk(name, dev, "VMs")? else { return Ok(None) };
    let name = name.to_string();
    if is_dir {
        let path = path.ok_or_else(|| bad(&name, "a directory share needs path (where the guest sees it)"))?;
        if !path.starts_with('/') || path == "/" {
            return Err(bad(&name, format!("path {path:?} must be an absolute guest path other than /")));
        }
        Ok(Some(DeviceSpec::Share { name, source, path, readonly }))
    } else {
        if path.is_some() {
            return Err(bad(&name, "a file or block device is attached as a disk; the guest mounts it (omit path)"));
        }
        Ok(Some(DeviceSpec::Disk { name, source, readonly }))
    }
}

/// Every device of an instance, in name order.
pub fn device_specs(devices: &BTreeMap<String, BTreeMap<String, String>>) -> Result<Vec<DeviceSpec>, DeviceError> {
    let mut out = Vec::new();
    for (name, dev) in devices {
        out.extend(device_spec(name, dev)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn shares_disks_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let img = dir.path().join("x.img");
        std::fs::write(&img, b"").unwrap();
        let i = img.display().to_string();
        assert_eq!(device_spec("root", &dev(&[("type", "disk"), ("path", "/"), ("pool", "default")])), Ok(None));
        assert_eq!(device_spec("eth0", &dev(&[("type", "nic"), ("network", "skiffbr0")])), Ok(None));
        let share =
            device_spec("data", &dev(&[("type", "disk"), ("source", &d), ("path", "/data"), ("readonly", "true")]));
        assert_eq!(
            share,
            Ok(Some(DeviceSpec::Share {
                name: "data".into(),
                source: dir.path().into(),
                path: "/data".into(),
                readonly: true
            }))
        );
        let disk = device_spec("scratch", &dev(&[("type", "disk"), ("source", &i)]));
        assert_eq!(disk, Ok(Some(DeviceSpec::Disk { name: "scratch".into(), source: img.clone(), readonly: false })));
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let errors: &[Case] = &[
            ("d", &[("type", "disk"), ("source", "/nonexistent/x"), ("path", "/d")], "No such file"),
            ("d", &[("type", "disk"), ("source", "rel"), ("path", "/d")], "absolute host path"),
            ("d", &[("type", "disk"), ("source", &d)], "needs path"),
            ("d", &[("type", "disk"), ("source", &d), ("path", "rel")], "absolute guest path"),
            ("d", &[("type", "disk"), ("source", &i), ("path", "/x")], "omit path"),
            ("d", &[("type", "disk"), ("source", &d), ("path", "/d"), ("size", "1G")], "unknown key"),
            ("d", &[("type", "disk"), ("source", &d), ("path", "/d"), ("readonly", "maybe")], "readonly"),
            ("d", &[("type", "gpu")], "VMs take disk"),
            ("bad/name", &[("type", "disk"), ("source", &d), ("path", "/d")], "names are"),
            ("d", &[("type", "disk"), ("path", "/d")], "no source"),
        ];
        for (name, kv, needle) in errors {
            let e = device_spec(name, &dev(kv)).unwrap_err().to_string();
            assert!(e.contains(needle), "{kv:?}: {e}");
        }
    }
}
