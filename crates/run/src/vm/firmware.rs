//! Full OS VMs: a [`ThinVm`] booted through UEFI firmware from a disk
//! image instead of a kernel, an initramfs and virtio-fs. The guest's own
//! bootloader, kernel and init run; its agent (a service of the guest's,
//! started with `--notify vsock:1025`) announces itself on the same vsock
//! event socket as a thin VM's, so exec, files and events work alike.
//!
//! ```text
//!   boot_os: runtime dir → event socket → skiff-vmm --firmware [CODE]
//!            --firmware-vars VARS --disk path=DISK,format=F --reset-exit-code 4
//!            → OVMF → the guest's bootloader → its init → agent `ready`
//!   power button: PUT vm.shutdown (ACPI) → the guest shuts down → exit 0
//!   reboot: the guest resets → skiff-vmm exits 4 → the monitor boots
//!           the same disk and variable store again (`reboot_os`)
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skiff_agent_client::EventListener;

use super::{ThinVm, VmError, VmExtras};
use crate::runtime::{VmState, SERIAL_SOCKET, VSOCK_SOCKET};

/// skiff-vmm's exit status when the guest resets (`--reset-exit-code`).
pub const RESET_EXIT_CODE: i32 = 4;
/// Resets before the agent is up that a boot survives.
const BOOT_RESETS: u32 = 3;

/// What a full OS VM boots: firmware, its variable store, the boot disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsBoot {
    /// The OVMF code image (`None`: skiff-vmm's default, Debian's
    /// `OVMF_CODE_4M.fd`).
    #[serde(default)]
    pub firmware: Option<PathBuf>,
    /// The VM's own UEFI variable store (made from the firmware's
    /// `OVMF_VARS*.fd` by skiff-vmm when missing); persists across boots.
    pub vars: PathBuf,
    /// The boot disk (virtio-blk).
    pub disk: PathBuf,
    /// Its format, `raw` or `qcow2`, as recorded (never probed).
    pub disk_format: String,
    /// A read-only raw disk after it: the cloud-init NoCloud seed.
    #[serde(default)]
    pub seed: Option<PathBuf>,
    /// The VM's SMBIOS system UUID (`None`: skiff-vmm picks one per start).
    #[serde(default)]
    pub uuid: Option<String>,
}

/// What to boot as a full OS VM.
#[derive(Debug, Clone)]
pub struct OsVmOptions {
    /// The VM's name (runtime directory).
    pub name: String,
    /// The directory of every VM's runtime directory.
    pub runtime_root: PathBuf,
    /// Firmware, variables and disk.
    pub os: OsBoot,
    /// vCPUs.
    pub cpus: u8,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// skiff-vmm.
    pub vmm: PathBuf,
    /// How long the guest's agent may take to announce itself (firmware,
    /// bootloader and a whole init: longer than a thin VM).
    pub boot_timeout: Duration,
    /// A label for `skiff-run list`.
    pub bundle: String,
}

impl OsVmOptions {
    /// skiff-vmm's arguments beyond what every VM has.
    fn vmm_args(&self) -> Vec<String> {
        let mut args = vec!["--firmware".to_string()];
        if let Some(code) = &self.os.firmware {
            args.push(code.display().to_string());
        }
        args.extend([
            "--firmware-vars".into(),
            self.os.vars.display().to_string(),
            "--disk".into(),
            format!("path={},format={}", self.os.disk.display(), self.os.disk_format),
            "--cpus".into(),
            self.cpus.to_string(),
            "--memory".into(),
            self.memory_mib.to_string(),
            "--rng".into(),
            "--reset-exit-code".into(),
            RESET_EXIT_CODE.to_string(),
        ]);
        if let Some(uuid) = &self.os.uuid {
            args.extend(["--uuid".into(), uuid.clone()]);
        }
        if let Some(seed) = &self.os.seed {
            args.extend(["--disk".into(), format!("path={},format=raw,readonly=on", seed.display())]);
        }
        args
    }
}

impl ThinVm {
    /// Boots a full OS VM and waits for its agent's ready event; on failure
    /// everything started is stopped and reaped before the error returns.
    pub async fn boot_os(opts: &OsVmOptions, extras: &VmExtras) -> Result<ThinVm, VmError> {
        let mut vm = ThinVm::unstarted(&opts.name);
        // The console of an OS is the serial port (a getty on ttyS0).
        vm.serial_socket = true;
        vm.prepare(&opts.runtime_root, &opts.name, extras.console_log.as_deref(), true)?;
        match vm.start_os(opts, extras).await {
            Ok(()) => Ok(vm),
            Err(e) => {
                vm.abort().await;
                Err(e)
            }
        }
    }

    /// After the guest reset (skiff-vmm exited with [`RESET_EXIT_CODE`]):
    /// boots it again in the same runtime directory, with the same disk and
    /// variable store, and waits for the agent. The console log goes on
    /// (the reboot's shutdown and the next boot stay in one log).
    pub async fn reboot_os(&mut self, opts: &OsVmOptions, extras: &VmExtras) -> Result<(), VmError> {
        self.end_boot().await;
        self.start_os(opts, extras).await
    }

    /// Forgets the last boot's skiff-vmm (reaped), agent connection and sockets.
    async fn end_boot(&mut self) {
        if let Some(mut old) = self.vmm.take() {
            super::kill_now(&mut old);
            let _ = old.wait().await;
        }
        self.events = None;
        self.listener = None;
        for socket in [super::VMM_API_SOCKET, VSOCK_SOCKET, SERIAL_SOCKET] {
            let _ = std::fs::remove_file(self.dir.join(socket));
        }
    }

    /// Starts skiff-vmm and waits for the agent; a guest that resets before
    /// its agent is up (firmware does, e.g. after its first boot changed
    /// its memory map variables) is booted again, up to [`BOOT_RESETS`]
    /// times. The boot timeout bounds all of it together: the boots after
    /// a reset get what is left of it, not a new one each.
    async fn start_os(&mut self, opts: &OsVmOptions, extras: &VmExtras) -> Result<(), VmError> {
        let deadline = tokio::time::Instant::now() + opts.boot_timeout;
        let mut resets = 0;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.start_os_once(opts, extras, left).await {
                Err(VmError::VmmExited { status, .. })
                    if status.code() == Some(RESET_EXIT_CODE) && resets < BOOT_RESETS =>
                {
                    resets += 1;
                    self.end_boot().await;
                }
                // The agent's timeout names the whole boot's limit.
                Err(VmError::AgentTimeout { report, .. }) => {
                    return Err(VmError::AgentTimeout { secs: opts.boot_timeout.as_secs(), report })
                }
                other => return other,
            }
        }
    }

    async fn start_os_once(&mut self, opts: &OsVmOptions, extras: &VmExtras, limit: Duration) -> Result<(), VmError> {
        let events = EventListener::bind_for_vsock(&self.dir.join(VSOCK_SOCKET))?;
        let state = VmState::starting(
            &opts.name,
            &opts.bundle,
            format!("firmware ({})", opts.os.disk.display()),
            opts.cpus,
            opts.memory_mib,
        );
        self.spawn_vmm(&opts.vmm, &opts.vmm_args(), extras.nic.as_ref(), state)?;
        self.wait_ready(events, limit).await
    }

    /// Presses the VM's ACPI power button (skiff-vmm's `vm.shutdown`): the
    /// guest's OS shuts down as it does for a power button.
    pub async fn press_power_button(&self) -> Result<(), super::HotplugError> {
        self.api(|c| c.shutdown()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firmware_args_name_the_disk_format_and_the_reset_status() {
        let opts = OsVmOptions {
            name: "os".into(),
            runtime_root: "/run/x".into(),
            os: OsBoot {
                firmware: None,
                vars: "/d/vars.fd".into(),
                disk: "/d/root.qcow2".into(),
                disk_format: "qcow2".into(),
                seed: None,
                uuid: None,
            },
            cpus: 2,
            memory_mib: 1024,
            vmm: "/bin/skiff-vmm".into(),
            boot_timeout: Duration::from_secs(1),
            bundle: String::new(),
        };
        let args = opts.vmm_args().join(" ");
        assert!(args.starts_with("--firmware --firmware-vars /d/vars.fd "), "{args}");
        assert!(args.contains("--disk path=/d/root.qcow2,format=qcow2"), "{args}");
        assert!(args.contains("--cpus 2 --memory 1024"), "{args}");
        assert!(args.ends_with("--reset-exit-code 4"), "{args}");
        let with_code = OsVmOptions { os: OsBoot { firmware: Some("/f/CODE.fd".into()), ..opts.os.clone() }, ..opts };
        assert!(with_code.vmm_args().join(" ").starts_with("--firmware /f/CODE.fd --firmware-vars"));
        let uuid = "6f1c3a52-0b7e-4d61-9a8e-2f0c5d9e7b14";
        let with_uuid = OsVmOptions { os: OsBoot { uuid: Some(uuid.into()), ..with_code.os.clone() }, ..with_code };
        assert!(with_uuid.vmm_args().join(" ").ends_with(&format!("--reset-exit-code 4 --uuid {uuid}")));
        let seeded =
            OsVmOptions { os: OsBoot { seed: Some("/d/seed.img".into()), ..with_uuid.os.clone() }, ..with_uuid };
        assert!(seeded.vmm_args().join(" ").ends_with("--disk path=/d/seed.img,format=raw,readonly=on"));
    }
}
