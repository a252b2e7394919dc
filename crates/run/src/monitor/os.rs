//! The monitor's full-OS-VM mode ([`LaunchSpec::os`]): boot through the
//! firmware from the disk, no main process, the ACPI power button for a
//! clean stop, and a reboot in place when the guest resets.
//!
//! ```text
//!   boot:   ThinVm::boot_os → agent ready → bind monitor.sock
//!   reset:  skiff-vmm exits 4 (RESET_EXIT_CODE) → ThinVm::reboot_os (same
//!           runtime dir, disk, vars, tap) → agent ready → supervise on
//!   stop:   press the power button (again every 10 s) → wait `timeout` for
//!           skiff-vmm to end (a reset meanwhile ends it too) → else SIGKILL;
//!           force: SIGKILL
//! ```

use std::time::Duration;

use tokio::net::UnixListener;

use super::proto::LaunchSpec;
use super::{MonitorError, CONTROL_SOCKET};
use crate::vm::{self, OsBoot, OsVmOptions, ThinVm, VmExtras, RESET_EXIT_CODE};
use crate::Stopped;

/// How often a stop presses the power button while the guest runs.
const PRESS_AGAIN: Duration = Duration::from_secs(10);

/// The boot options of a full OS VM's spec.
pub fn os_options(spec: &LaunchSpec, os: &OsBoot) -> Result<(OsVmOptions, VmExtras), MonitorError> {
    let (root, name) = super::split_runtime_dir(&spec.runtime_dir)?;
    let vmm = match &spec.vmm {
        Some(p) => p.clone(),
        None => vm::find_vmm()?,
    };
    let opts = OsVmOptions {
        name,
        runtime_root: root,
        os: os.clone(),
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        vmm,
        boot_timeout: Duration::from_secs(spec.boot_timeout_secs),
        bundle: if spec.label.is_empty() { spec.name.clone() } else { spec.label.clone() },
    };
    let extras = VmExtras { console_log: Some(spec.console_log.clone()), nic: spec.nic.clone(), ..Default::default() };
    Ok((opts, extras))
}

/// Boots the full OS VM and binds the control socket.
pub async fn boot(spec: &LaunchSpec, os: &OsBoot) -> Result<(ThinVm, UnixListener), MonitorError> {
    if let Some(d) = spec.devices.first() {
        return Err(MonitorError::Unsupported(format!(
            "device {}: devices of full OS VMs (shares, more disks) are not supported yet",
            d.name()
        )));
    }
    let (opts, extras) = os_options(spec, os)?;
    let vm = ThinVm::boot_os(&opts, &extras).await?;
    let path = vm.runtime_dir().join(CONTROL_SOCKET);
    match UnixListener::bind(&path) {
        Ok(l) => Ok((vm, l)),
        Err(e) => {
            let mut vm = vm;
            vm.kill_vmm();
            let _ = vm.shutdown(Duration::ZERO).await;
            Err(MonitorError::Io(format!("binding {}", path.display()), e))
        }
    }
}

/// Whether skiff-vmm's end is the guest's reset of a full OS VM (which
/// the monitor answers by booting it again).
pub fn is_reset(spec: &LaunchSpec, status: &Result<std::process::ExitStatus, crate::VmError>) -> bool {
    spec.os.is_some() && matches!(status, Ok(s) if s.code() == Some(RESET_EXIT_CODE))
}

/// Boots the VM again after the guest's reset.
pub async fn reboot(spec: &LaunchSpec, vm: &mut ThinVm) -> Result<(), MonitorError> {
    let os = spec.os.as_ref().ok_or_else(|| MonitorError::Protocol("not a full OS VM".into()))?;
    let (opts, extras) = os_options(spec, os)?;
    vm.reboot_os(&opts, &extras).await?;
    Ok(())
}

/// Stops a full OS VM: the ACPI power button and up to `timeout` seconds
/// for the guest to power off (or reset), then SIGKILL; `force`: SIGKILL
/// at once. The button is pressed again every [`PRESS_AGAIN`] while the
/// guest runs: a press the guest's OS is not listening for yet (one still
/// booting: its agent answers before systemd-logind watches the button)
/// is lost, as on real hardware, and a second press of a guest already
/// shutting down changes nothing.
pub async fn stop(mut vm: ThinVm, timeout: u64, force: bool) -> Result<Stopped, crate::VmError> {
    if !force {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        loop {
            if let Err(e) = vm.press_power_button().await {
                eprintln!("skiff-run monitor {}: power button: {}", vm.name(), super::error_chain(&e));
                break;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if vm.wait_vmm(left.min(PRESS_AGAIN)).await?.is_some() {
                break;
            }
            if left <= PRESS_AGAIN {
                eprintln!("skiff-run monitor {}: the guest did not power off within {timeout} s: killed", vm.name());
                break;
            }
        }
    }
    if vm.wait_vmm(Duration::ZERO).await?.is_none() {
        vm.kill_vmm();
        let _ = tokio::time::timeout(Duration::from_secs(5), vm.vmm_exited()).await;
    }
    vm.shutdown(Duration::ZERO).await
}
