//! A running thin VM changed at runtime through skiff-vmm's control API
//! (its `--api-socket`, `vmm.sock` in the runtime directory) and the
//! agent: pause and resume, shares and disks added and removed, vCPUs and
//! memory resized.
//!
//! A share is a virtiofsd started for the directory, hot-plugged as a
//! virtio-fs device whose tag is the share's name, then mounted by the
//! agent; removing it unmounts first, then asks the guest to eject the
//! device, then stops virtiofsd. A disk is a virtio-blk device whose serial
//! is its name (the guest finds it as `/dev/disk/by-id/virtio-NAME`). Every
//! step that fails undoes the steps before it.

use std::path::Path;
use std::time::{Duration, Instant};

use skiff_agent_proto::{MountRequest, UnmountRequest};
use skiff_vmm_client::types::{DiskSpec, FsSpec, Resize};
use skiff_vmm_client::{Client, ClientError};

use super::{Share, ThinVm};

/// skiff-vmm's control socket in the runtime directory.
pub const VMM_API_SOCKET: &str = "vmm.sock";
/// How long a hot-plugged share's device may take to appear in the guest
/// (its driver probes after the ACPI notification) before the mount fails.
const MOUNT_WAIT: Duration = Duration::from_secs(15);

/// Why a runtime change failed.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("skiff-vmm")]
    Vmm(#[source] ClientError),
    #[error("the agent could not mount share {name} at {path}")]
    Mount {
        name: String,
        path: String,
        #[source]
        source: skiff_agent_client::ClientError,
    },
    #[error("the agent could not unmount share {name} from {path}")]
    Unmount {
        name: String,
        path: String,
        #[source]
        source: skiff_agent_client::ClientError,
    },
    #[error("starting virtiofsd for share {0}")]
    Virtiofsd(String, #[source] Box<super::VmError>),
    #[error("device names are 1-32 characters of a-z, A-Z, 0-9, '-' and '_'; got {0:?}")]
    BadName(String),
    #[error("{0} is not an absolute path in the guest")]
    BadPath(String),
    #[error("no device {0} was added to this VM at runtime")]
    Unknown(String),
    #[error("the control API thread failed")]
    Join(#[source] tokio::task::JoinError),
}

/// A device added at runtime.
#[derive(Debug)]
pub(crate) struct HotDevice {
    name: String,
    /// Where the agent mounted it (shares).
    mount: Option<String>,
    /// A share's virtiofsd: started with `kill_on_drop`, so dropping the
    /// device (removal, a failed add, the VM's end) stops it.
    _virtiofsd: Option<tokio::process::Child>,
}

impl HotDevice {
    /// A device a restored VM got back from its snapshot.
    pub(crate) fn restored(name: &str, mount: Option<String>, virtiofsd: Option<tokio::process::Child>) -> Self {
        HotDevice { name: name.into(), mount, _virtiofsd: virtiofsd }
    }
}

/// Whether `name` can name a device: 1-32 characters of a-z, A-Z, 0-9,
/// '-' and '_' (it becomes a virtio-fs tag, a disk serial, a socket name).
pub fn valid_device_name(name: &str) -> bool {
    (1..=32).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn check_name(name: &str) -> Result<(), HotplugError> {
    if valid_device_name(name) {
        Ok(())
    } else {
        Err(HotplugError::BadName(name.into()))
    }
}

impl ThinVm {
    /// A client for this VM's skiff-vmm control API.
    pub fn vmm_api(&self) -> Client {
        Client::new(self.dir.join(VMM_API_SOCKET))
    }

    /// Runs a blocking control-API call off the async runtime.
    pub(super) async fn api<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Client) -> Result<T, ClientError> + Send + 'static,
    ) -> Result<T, HotplugError> {
        let client = self.vmm_api();
        tokio::task::spawn_blocking(move || f(&client)).await.map_err(HotplugError::Join)?.map_err(HotplugError::Vmm)
    }

    /// Parks every vCPU and device of the VM.
    pub async fn pause(&self) -> Result<(), HotplugError> {
        self.api(|c| c.pause()).await
    }

    /// Lets a paused VM run again.
    pub async fn resume(&self) -> Result<(), HotplugError> {
        self.api(|c| c.resume()).await
    }

    /// Saves the paused VM into `dir` (skiff-vmm's `state` and `memory`);
    /// memory takes a while to write, so this allows `limit`.
    pub async fn snapshot(&self, dir: &Path, limit: Duration) -> Result<(), HotplugError> {
        let dir = dir.to_path_buf();
        let client = self.vmm_api().with_timeout(limit);
        tokio::task::spawn_blocking(move || client.snapshot(&dir))
            .await
            .map_err(HotplugError::Join)?
            .map(drop)
            .map_err(HotplugError::Vmm)
    }

    /// Changes the vCPUs or memory; the agent onlines what is added.
    pub async fn resize(&self, cpus: Option<u8>, memory_mib: Option<u64>) -> Result<(), HotplugError> {
        self.api(move |c| c.resize(&Resize { vcpus: cpus, memory_mib })).await
    }

    /// Shares host directory `dir` at guest path `path` (read-only if asked)
    /// under the device name `name`.
    pub async fn add_share(
        &mut self,
        virtiofsd: &Path,
        name: &str,
        dir: &Path,
        path: &str,
        readonly: bool,
    ) -> Result<(), HotplugError> {
        check_name(name)?;
        if !path.starts_with('/') {
            return Err(HotplugError::BadPath(path.into()));
        }
        let socket = self.dir.join(format!("hp-{name}.sock"));
        let log = self.dir.join(format!("virtiofsd-{name}.log"));
        let share = Share { tag: name.into(), dir: dir.to_path_buf() };
        let started = self.start_virtiofsd(virtiofsd, &share, &socket, &log).await;
        // start_virtiofsd keeps the child with the boot-time ones: take it.
        // Every early return below drops it, which stops it.
        let device = HotDevice { name: name.into(), mount: Some(path.into()), _virtiofsd: self.virtiofsd.pop() };
        started.map_err(|e| HotplugError::Virtiofsd(name.into(), Box::new(e)))?;
        let spec = FsSpec { id: Some(name.into()), tag: name.into(), socket: socket.clone() };
        self.api(move |c| c.add_fs(&spec)).await?;
        let mut options = vec!["nosuid".to_string(), "nodev".to_string()];
        if readonly {
            options.push("ro".into());
        }
        let request = MountRequest { source: name.into(), target: path.into(), fstype: "virtiofs".into(), options };
        // The guest's driver probes the device after the ACPI notification.
        let deadline = Instant::now() + MOUNT_WAIT;
        let mounted = loop {
            match self.agent().mount(request.clone()).await {
                Ok(()) => break Ok(()),
                Err(e) if Instant::now() >= deadline => break Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        if let Err(source) = mounted {
            let id = name.to_string();
            let _ = self.api(move |c| c.remove_device(&id)).await;
            return Err(HotplugError::Mount { name: name.into(), path: path.into(), source });
        }
        self.hot.push(device);
        Ok(())
    }

    /// Attaches the image or block device `source` as a virtio-blk disk
    /// named `name` (its serial, so `/dev/disk/by-id/virtio-NAME`).
    pub async fn add_disk(&mut self, name: &str, source: &Path, readonly: bool) -> Result<(), HotplugError> {
        check_name(name)?;
        // Skiff's disks are raw: said, so that a guest writing the qcow2 magic into one cannot make its next attach fail.
        let spec = DiskSpec {
            id: Some(name.into()),
            path: source.to_path_buf(),
            readonly,
            serial: Some(name.into()),
            format: Some("raw".into()),
        };
        self.api(move |c| c.add_disk(&spec).map(drop)).await?;
        self.hot.push(HotDevice { name: name.into(), mount: None, _virtiofsd: None });
        Ok(())
    }

    /// Removes device `name` added at runtime: unmounts it (shares), asks
    /// the guest to eject it, and stops its virtiofsd.
    pub async fn remove_device(&mut self, name: &str) -> Result<(), HotplugError> {
        let i = self.hot.iter().position(|d| d.name == name).ok_or_else(|| HotplugError::Unknown(name.into()))?;
        if let Some(path) = self.hot[i].mount.clone() {
            let request = UnmountRequest { target: path.clone(), lazy: false };
            self.agent().unmount(request).await.map_err(|source| HotplugError::Unmount {
                name: name.into(),
                path: path.clone(),
                source,
            })?;
            self.hot[i].mount = None;
        }
        let id = name.to_string();
        self.api(move |c| c.remove_device(&id)).await?;
        self.hot.remove(i);
        Ok(())
    }

    /// Stops the virtiofsd of every share added at runtime (the VM ended).
    pub(crate) fn stop_hot_devices(&mut self) {
        self.hot.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        for ok in ["data", "my-disk_2", "a"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "../x", "a b", &"x".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
