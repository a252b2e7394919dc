//! `vm.snapshot`: saving the paused VM (see [`crate::snapshot`] for the
//! files and the order).

use std::path::Path;
use std::time::Instant;

use skiff_vmm_client::types::SnapshotSaved;

use super::{lock, Vmm, VCPU_ANSWER};
use crate::api::VmReply;
use crate::device_manager::DeviceStateError;
use crate::snapshot::format::{write_file, FormatError};
use crate::snapshot::memory::{save_memory, MemoryFileError};
use crate::snapshot::vcpu::{save_vcpu, VcpuState, VcpuStateError};
use crate::snapshot::vm_state::{save_vm, VmStateError};
use crate::snapshot::{VmSnapshot, MEMORY_FILE, STATE_FILE};
use crate::vstate::vcpu_thread::{VcpuHandle, VcpuState as ThreadState, VcpuThreadError};

/// Why the VM could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("cannot create the snapshot directory {path}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot save the devices")]
    Devices(#[source] DeviceStateError),
    #[error("cannot read KVM's MSR list")]
    MsrList(#[source] kvm_ioctls::Error),
    #[error("cannot take a vCPU from its thread")]
    Thread(#[source] VcpuThreadError),
    #[error("cannot save a vCPU")]
    Vcpu(#[source] VcpuStateError),
    #[error("cannot save the irqchip, PIT or clock")]
    Vm(#[source] VmStateError),
    #[error("cannot save guest memory")]
    Memory(#[source] MemoryFileError),
    #[error("cannot write the state file")]
    State(#[source] FormatError),
}

impl Vmm {
    /// Handles `vm.snapshot`: the VM must be paused and have only devices
    /// snapshots carry; it stays paused.
    pub(super) fn snapshot(&mut self, dir: &Path) -> VmReply {
        if !self.paused {
            return VmReply::error(409, "the VM is running; pause it before a snapshot");
        }
        if self.p.config.firmware.is_some() {
            return VmReply::error(409, "a firmware-booted VM cannot be snapshotted yet");
        }
        if self.p.ram.hotplug.is_some() {
            return VmReply::error(409, "a VM with a memory hot-plug region (virtio-mem) cannot be snapshotted yet");
        }
        if !self.removals.is_empty() {
            return VmReply::error(409, "a device removal is waiting for the guest; try again once it ends");
        }
        let t = Instant::now();
        match self.save(dir) {
            Ok((state_bytes, memory_bytes)) => {
                let elapsed_ms = t.elapsed().as_millis() as u64;
                log::info!(
                    "snapshot saved to {} in {elapsed_ms} ms: state {state_bytes} bytes, {} MiB of memory",
                    dir.display(),
                    memory_bytes >> 20
                );
                VmReply::json(&SnapshotSaved { state_bytes, memory_bytes, elapsed_ms })
            }
            Err(e) => {
                let status = match e {
                    SaveError::Devices(DeviceStateError::Unsupported { .. } | DeviceStateError::Removing(_)) => 409,
                    _ => 500,
                };
                VmReply::error(status, crate::error_chain(&e))
            }
        }
    }

    fn save(&mut self, dir: &Path) -> Result<(u64, u64), SaveError> {
        let devices = self.p.pci.save_devices().map_err(SaveError::Devices)?;
        std::fs::create_dir_all(dir).map_err(|source| SaveError::Dir { path: dir.display().to_string(), source })?;
        let vcpus = self.save_vcpus()?;
        let vm = save_vm(self.p.vm.fd()).map_err(SaveError::Vm)?;
        let c = &self.p.config;
        let snap = VmSnapshot {
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            kernel: c.kernel.clone(),
            cmdline: c.cmdline.clone(),
            boot_cpus: c.cpus,
            max_cpus: c.max_cpus,
            memory_mib: c.memory_mib,
            vcpus,
            vm,
            serial: lock(&self.p.serial).state(),
            devices,
        };
        let memory = save_memory(&self.p.ram, &dir.join(MEMORY_FILE)).map_err(SaveError::Memory)?;
        let state = write_file(&dir.join(STATE_FILE), &snap).map_err(SaveError::State)?;
        Ok((state, memory))
    }

    /// Takes every vCPU from its (paused) thread, saves it and gives it a
    /// new paused thread, whatever happened.
    fn save_vcpus(&mut self) -> Result<Vec<VcpuState>, SaveError> {
        let msr_list = kvm_ioctls::Kvm::new()
            .and_then(|kvm| kvm.get_msr_index_list())
            .map_err(SaveError::MsrList)?
            .as_slice()
            .to_vec();
        let mut vcpus = Vec::with_capacity(self.handles.len());
        let mut result = Ok(());
        for h in std::mem::take(&mut self.handles) {
            match h.finish(VCPU_ANSWER) {
                Ok(v) => vcpus.push(v),
                Err(e) => result = result.and(Err(SaveError::Thread(e))),
            }
        }
        let mut states = Vec::with_capacity(vcpus.len());
        if result.is_ok() {
            for v in &mut vcpus {
                match save_vcpu(v, &msr_list) {
                    Ok(s) => states.push(s),
                    Err(e) => {
                        result = Err(SaveError::Vcpu(e));
                        break;
                    }
                }
            }
        }
        for v in vcpus {
            match VcpuHandle::spawn(v, ThreadState::Paused) {
                Ok(h) => self.handles.push(h),
                Err(e) => result = result.and(Err(SaveError::Thread(e))),
            }
        }
        result.map(|()| states)
    }
}
