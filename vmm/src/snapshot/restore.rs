//! Bringing a snapshot back in this process (see the module above for
//! the order of things).

use std::path::PathBuf;
use std::time::Instant;

use super::format::{read_file, FormatError};
use super::memory::{copy_memory, map_memory, MemoryFileError};
use super::vcpu::{check_vcpu_state, restore_vcpu, VcpuStateError};
use super::vm_state::{restore_vm_state, VmStateError};
use super::{VmSnapshot, MEMORY_FILE, STATE_FILE};
use crate::builder::{attach_platform, BuildError, Built, Buses};
use crate::config::{SerialConfig, VmConfig, MAX_CPUS, MIN_MEMORY_MIB};
use crate::device_manager::{devices_for_restore, DeviceConfig, DeviceError, DeviceSpec, DeviceStateError, PciDevices};
use crate::devices::ged::event;
use crate::devices::vmgenid::{format_id, read_generation_id, write_generation_id, VmGenIdError};
use crate::vmm::{lock, Vmm};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{open_kvm, Vm, VmError};

/// What `--restore` is given: the snapshot and the host side anew.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// The snapshot directory.
    pub dir: PathBuf,
    pub serial: SerialConfig,
    pub api_socket: Option<PathBuf>,
    /// Devices given on the command line: they replace the snapshot's
    /// host side of the device with the same id.
    pub devices: DeviceConfig,
}

/// Why a snapshot cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("bad snapshot state")]
    Format(#[source] FormatError),
    #[error("the snapshot is not usable: {0}")]
    Invalid(String),
    #[error("bad snapshot memory")]
    Memory(#[source] MemoryFileError),
    #[error("bad vCPU state")]
    VcpuState(#[source] VcpuStateError),
    #[error("cannot restore the devices")]
    Devices(#[source] DeviceStateError),
    #[error("cannot create the VM")]
    Vm(#[source] VmError),
    #[error("cannot set up the PCI bus")]
    Pci(#[source] DeviceError),
    #[error("cannot set up the platform devices")]
    Build(#[source] BuildError),
    #[error("cannot create a vCPU")]
    Vcpu(#[source] VcpuError),
    #[error("cannot restore the irqchip, PIT or clock")]
    VmState(#[source] VmStateError),
    #[error("cannot set the VM generation ID")]
    GenerationId(#[source] VmGenIdError),
}

impl RestoreError {
    /// Whether the files or arguments are at fault (rather than the host):
    /// skiff-vmm then exits with status 2.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            RestoreError::Format(_)
                | RestoreError::Invalid(_)
                | RestoreError::Memory(MemoryFileError::Size { .. })
                | RestoreError::VcpuState(VcpuStateError::TooMany { .. })
                | RestoreError::Devices(_)
        )
    }
}

/// Checks what the state file says before anything is created from it.
fn check(snap: &VmSnapshot) -> Result<(), RestoreError> {
    let invalid = |m: String| Err(RestoreError::Invalid(m));
    let n = snap.vcpus.len();
    if n == 0 || n > usize::from(MAX_CPUS) {
        return invalid(format!("it has {n} vCPUs; skiff-vmm runs 1 to {MAX_CPUS}"));
    }
    if snap.max_cpus > MAX_CPUS || snap.boot_cpus == 0 || snap.boot_cpus > snap.max_cpus {
        return invalid(format!("--cpus boot={},max={} is impossible", snap.boot_cpus, snap.max_cpus));
    }
    if n > usize::from(snap.max_cpus) {
        return invalid(format!("it has {n} vCPUs, more than its max of {}", snap.max_cpus));
    }
    if let Some((i, v)) = snap.vcpus.iter().enumerate().find(|(i, v)| usize::from(v.id) != *i) {
        return invalid(format!("vCPU {i} is saved with id {}", v.id));
    }
    for v in &snap.vcpus {
        check_vcpu_state(v).map_err(RestoreError::VcpuState)?;
    }
    if snap.memory_mib < MIN_MEMORY_MIB || snap.memory_mib > (1 << 30) {
        return invalid(format!("{} MiB of guest memory", snap.memory_mib));
    }
    Ok(())
}

/// Restores the snapshot in `cfg.dir`; `start` is when the VMM started.
/// Nothing runs until [`Vmm::run`], which starts the vCPUs.
pub fn restore_vm(cfg: &RestoreConfig, start: Instant) -> Result<Vmm, RestoreError> {
    let step = |what: &str| log::debug!("restore: {what}: {} µs after start", start.elapsed().as_micros());
    let snap: VmSnapshot = read_file(&cfg.dir.join(STATE_FILE)).map_err(RestoreError::Format)?;
    check(&snap)?;
    let devices = devices_for_restore(&snap.devices, &cfg.devices).map_err(RestoreError::Devices)?;
    step("state read and checked");
    let n = snap.vcpus.len() as u8;
    let kvm = open_kvm(n).map_err(RestoreError::Vm)?;
    // A vhost-user backend maps guest memory itself: it needs shared
    // memory, not the private mapping of the file (see memory.rs).
    let vhost_user = snap.devices.iter().any(|d| matches!(d.spec, DeviceSpec::Fs { .. }));
    let (memory, size) = (cfg.dir.join(MEMORY_FILE), snap.memory_mib << 20);
    let t = Instant::now();
    let ram = if vhost_user {
        copy_memory(&memory, size).map(|(ram, copied)| {
            let ms = t.elapsed().as_millis();
            log::info!("memory: {} MiB copied into shared memory (virtio-fs) in {ms} ms", copied >> 20);
            ram
        })
    } else {
        map_memory(&memory, size)
    };
    let ram = ram.map_err(RestoreError::Memory)?;
    let vm = Vm::new(&kvm, &ram.mem).map_err(RestoreError::Vm)?;
    step(if vhost_user { "memory copied into a memfd, VM created" } else { "memory mapped, VM created" });

    let buses = Buses::new().map_err(RestoreError::Build)?;
    let mut pci =
        PciDevices::new(vm.fd().clone(), buses.io.clone(), buses.mmio.clone(), &ram).map_err(RestoreError::Pci)?;
    for (new, saved) in devices {
        pci.restore_device(new, &saved).map_err(RestoreError::Devices)?;
    }
    step("devices restored");
    let cpus = (n, snap.max_cpus);
    let platform =
        attach_platform(&vm, &buses, cpus, &cfg.serial, Some(&snap.serial), start).map_err(RestoreError::Build)?;

    let vcpu_ctx = buses.vcpu_context(&ram);
    let mut vcpus = Vec::with_capacity(snap.vcpus.len());
    for s in &snap.vcpus {
        let vcpu = Vcpu::new(&vm, s.id, vcpu_ctx.clone()).map_err(RestoreError::Vcpu)?;
        restore_vcpu(&vcpu, s).map_err(RestoreError::VcpuState)?;
        vcpus.push(vcpu);
    }
    restore_vm_state(vm.fd(), &snap.vm).map_err(RestoreError::VmState)?;
    // Only now may devices work and interrupt: every LAPIC holds its state.
    pci.resume_all();
    // A new generation ID, and the guest told (it reseeds its RNG).
    let old = read_generation_id(&ram.mem);
    let id = write_generation_id(&ram.mem).map_err(RestoreError::GenerationId)?;
    if let Err(e) = lock(&platform.ged).notify(event::GENERATION_ID) {
        log::warn!("cannot tell the guest its new generation ID: {e}");
    }
    log::info!("VM generation ID {} (was {})", format_id(&id), old.map(|o| format_id(&o)).unwrap_or_default());
    step("vCPUs, irqchip, PIT and clock restored");
    log::info!(
        "restored {} vCPUs, {} MiB and {} devices from {}",
        n,
        snap.memory_mib,
        pci.infos().len(),
        cfg.dir.display()
    );

    let config = VmConfig {
        kernel: snap.kernel,
        initramfs: None,
        cmdline: snap.cmdline,
        cpus: snap.boot_cpus,
        max_cpus: snap.max_cpus,
        memory_mib: snap.memory_mib,
        hotplug_mib: 0,
        serial: cfg.serial.clone(),
        api_socket: cfg.api_socket.clone(),
        devices: cfg.devices.clone(),
    };
    Ok(Built { config, start, vm, ram, vcpus, buses, pci, platform, vcpu_ctx }.into_vmm())
}
