//! cloud-init for full OS VMs: Incus's `cloud-init.user-data`,
//! `cloud-init.vendor-data` and `cloud-init.network-config` (and the older
//! `user.user-data`, `user.vendor-data`, `user.network-config`,
//! `user.meta-data`) reach the guest as a NoCloud seed: a small FAT disk
//! labelled `CIDATA` with `meta-data` (the instance's UUID as
//! `instance-id`, its name as `local-hostname`), `user-data`,
//! `vendor-data` and `network-config`, attached read-only beside the boot
//! disk. cloud-init finds it by its label (ds-identify's NoCloud check).
//!
//! Made again at every start from the configuration of the moment (a
//! change applies at the next boot; cloud-init runs its once-per-instance
//! modules only for a new `instance-id`). Without any of these keys there
//! is no seed and cloud-init in the guest stays off.
//!
//! Built with `mkfs.fat` and `mcopy` (dosfstools, mtools): no loop device
//! or mount.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{DriverError, InstanceSpec};

/// The seed's file name in the VM's `os/` directory.
const SEED: &str = "seed.img";
/// Most bytes of all cloud-init values together (the seed is sized by
/// them).
pub const MAX_SEED_DATA: usize = 4 << 20;

/// Each file of the seed and the keys it comes from (Incus's first).
const SEED_FILES: [(&str, [&str; 2]); 3] = [
    ("user-data", ["cloud-init.user-data", "user.user-data"]),
    ("vendor-data", ["cloud-init.vendor-data", "user.vendor-data"]),
    ("network-config", ["cloud-init.network-config", "user.network-config"]),
];
/// Appended to the seed's `meta-data`.
const META_DATA_KEY: &str = "user.meta-data";

/// Whether `key` feeds the seed.
fn is_seed_key(key: &str) -> bool {
    key == META_DATA_KEY || SEED_FILES.iter().any(|(_, keys)| keys.contains(&key))
}

/// The seed's files, from the instance's configuration; `None` without
/// any cloud-init key.
fn seed_files(inst: &InstanceSpec) -> Option<BTreeMap<&'static str, String>> {
    let get = |keys: &[&str]| keys.iter().find_map(|k| inst.config.get(*k)).cloned();
    let mut files = BTreeMap::new();
    for (file, keys) in SEED_FILES {
        if let Some(v) = get(&keys) {
            files.insert(file, v);
        }
    }
    if files.is_empty() {
        return None;
    }
    // NoCloud wants user-data even when only vendor data is given.
    files.entry("user-data").or_insert_with(|| "#cloud-config\n{}\n".into());
    let mut meta = format!("instance-id: {}\nlocal-hostname: {}\n", inst.id, inst.name);
    if let Some(extra) = inst.config.get(META_DATA_KEY) {
        meta.push_str(extra);
        meta.push('\n');
    }
    files.insert("meta-data", meta);
    Some(files)
}

/// Checks the cloud-init values' total size (at create and config set).
pub fn validate(config: &BTreeMap<String, String>) -> Result<(), String> {
    let total: usize =
        config.iter().filter(|(k, _)| k.starts_with("cloud-init.") || is_seed_key(k)).map(|(_, v)| v.len()).sum();
    if total > MAX_SEED_DATA {
        return Err(format!("the cloud-init values take {total} bytes; at most {MAX_SEED_DATA} fit the seed"));
    }
    Ok(())
}

/// A thin VM runs its image's entrypoint, not an OS whose cloud-init
/// would read a seed: its `cloud-init.*` keys are refused, not ignored.
pub(super) fn refuse_for_thin_vms(inst: &InstanceSpec) -> Result<(), DriverError> {
    match inst.config.keys().find(|k| k.starts_with("cloud-init.")) {
        Some(key) => Err(DriverError::Config {
            key: key.clone(),
            why: "only VMs of disk images (full OS VMs) take it; a thin VM runs its image's entrypoint".into(),
        }),
        None => Ok(()),
    }
}

/// Writes the VM's seed into `os_dir` (replacing the last one) and returns
/// its path, or removes a stale one and returns `None` when the instance
/// has no cloud-init configuration.
pub(super) fn write(inst: &InstanceSpec, os_dir: &Path) -> Result<Option<PathBuf>, DriverError> {
    let path = os_dir.join(SEED);
    let staging = os_dir.join(".seed-files");
    let host = |what: &str, e: std::io::Error| DriverError::Host(format!("{what} {}: {e}", path.display()));
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(host("removing the old seed", e)),
        _ => {}
    }
    let Some(files) = seed_files(inst) else { return Ok(None) };
    let data: usize = files.values().map(String::len).sum();
    if data > MAX_SEED_DATA + 4096 {
        return Err(DriverError::Config {
            key: "cloud-init.user-data".into(),
            why: format!("{data} bytes of cloud-init data; at most {MAX_SEED_DATA}"),
        });
    }
    // FAT12/16 overhead and clusters: twice the data and 1 MiB.
    let kib = (2 * data / 1024 + 1024).to_string();
    let made = (|| {
        run(Command::new("mkfs.fat").args(["-C", "-n", "CIDATA"]).arg(&path).arg(&kib))?;
        std::fs::create_dir_all(&staging).map_err(|e| host("staging the files of", e))?;
        for (name, content) in &files {
            let src = staging.join(name);
            std::fs::write(&src, content).map_err(|e| host("staging the files of", e))?;
            run(Command::new("mcopy").arg("-i").arg(&path).arg(&src).arg(format!("::/{name}")))?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&staging);
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(Some(path))
}

fn run(cmd: &mut Command) -> Result<(), DriverError> {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|e| {
        DriverError::Host(format!("cannot run {prog} to make the cloud-init seed (dosfstools, mtools): {e}"))
    })?;
    if !out.status.success() {
        return Err(DriverError::Host(format!(
            "{prog} failed making the cloud-init seed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(dir: &Path, config: &[(&str, &str)]) -> InstanceSpec {
        InstanceSpec {
            name: "os1".into(),
            id: "6b1f0c2e-8a4d-4b8e-9d52-0e6f1c3a7b90".into(),
            config: config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            image_rootfs: PathBuf::new(),
            image_config: serde_json::Value::Null,
            image_kind: crate::ImageKind::Disk(disk_image::Format::Qcow2),
            nic: None,
            devices: BTreeMap::new(),
            dir: dir.to_path_buf(),
        }
    }

    fn mtype(image: &Path, name: &str) -> String {
        let out = Command::new("mtype").arg("-i").arg(image).arg(format!("::/{name}")).output().unwrap();
        assert!(out.status.success(), "mtype {name}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn a_seed_carries_the_config_and_none_is_made_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let user = "#cloud-config\nruncmd: [touch /root/seeded]\n";
        let inst = instance(dir.path(), &[("cloud-init.user-data", user), ("user.network-config", "version: 2\n")]);
        let seed = write(&inst, dir.path()).unwrap().expect("a seed");
        let label = Command::new("mlabel").arg("-s").arg("-i").arg(&seed).arg("::").output().unwrap();
        assert!(String::from_utf8_lossy(&label.stdout).contains("CIDATA"), "{label:?}");
        assert_eq!(mtype(&seed, "user-data"), user);
        assert_eq!(mtype(&seed, "network-config"), "version: 2\n");
        let meta = mtype(&seed, "meta-data");
        assert!(meta.contains("instance-id: 6b1f0c2e-") && meta.contains("local-hostname: os1"), "{meta}");
        // Only the seed is left in the directory.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(SEED)]);
        // Without the keys the next start has no seed, and the old one is gone.
        assert!(write(&instance(dir.path(), &[]), dir.path()).unwrap().is_none());
        assert!(!seed.exists());
        // Vendor data alone still gets a user-data.
        let seed = write(&instance(dir.path(), &[("cloud-init.vendor-data", "#cloud-config\n")]), dir.path())
            .unwrap()
            .unwrap();
        assert!(mtype(&seed, "user-data").starts_with("#cloud-config"));
    }

    #[test]
    fn oversized_values_are_refused() {
        let big = "x".repeat(MAX_SEED_DATA + 1);
        let config = BTreeMap::from([("cloud-init.user-data".to_string(), big)]);
        assert!(validate(&config).unwrap_err().contains("cloud-init"));
        let config = BTreeMap::from([("cloud-init.user-data".to_string(), "#cloud-config\n".to_string())]);
        assert!(validate(&config).is_ok());
    }
}
