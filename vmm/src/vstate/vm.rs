//! The KVM VM: created with an in-kernel irqchip (PIC, IOAPIC, LAPICs) and
//! PIT, and guest RAM registered as memory slots.

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_CAP_EXIT_ON_EMULATION_FAILURE,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use std::sync::Arc;

use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::cpuid::add_tsc_deadline;
use crate::arch::layout::KVM_TSS_ADDRESS;

/// Errors while creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("KVM allows at most {max} vCPUs; {asked} were asked for")]
    TooManyVcpus { asked: u8, max: usize },
    #[error("cannot {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens `/dev/kvm` and checks the capabilities skiff-vmm relies on and the
/// vCPU limit. Creates no VM, so it can run while arguments are validated.
pub fn open_kvm(cpus: u8) -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let caps = [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ];
    for (cap, name) in caps {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    let max = kvm.get_max_vcpus();
    if usize::from(cpus) > max {
        return Err(VmError::TooManyVcpus { asked: cpus, max });
    }
    Ok(kvm)
}

/// Whether this host's KVM is KVM-PVM (a paravirtual KVM that cannot run
/// stock guest kernels), where failures of stock kernels are expected.
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// A KVM VM with its memory registered.
pub struct Vm {
    fd: Arc<VmFd>,
    supported_cpuid: CpuId,
}

impl Vm {
    /// Creates the VM, its irqchip and PIT, and registers `mem`.
    pub fn new(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        Self::with_tss(kvm, mem, KVM_TSS_ADDRESS)
    }

    /// [`Self::new`] with KVM's TSS (Intel) at `tss` instead of the default.
    pub fn with_tss(kvm: &Kvm, mem: &GuestMemoryMmap, tss: usize) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(kvm_err("create the VM"))?;
        fd.set_tss_address(tss).map_err(kvm_err("set the TSS address"))?;
        fd.create_irq_chip().map_err(kvm_err("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region.get_host_address(vm_memory::MemoryRegionAddress(0)).map_err(|_| VmError::Kvm {
                what: "find the host mapping of guest memory",
                source: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned
            // by `mem`, which outlives the VM (the VMM keeps both until exit),
            // and slots do not overlap because the regions do not.
            unsafe { fd.set_user_memory_region(r) }.map_err(kvm_err("register guest memory"))?;
        }
        // Emulation failures at any privilege level exit to the VMM with the
        // instruction bytes, instead of a #UD injected into a user process.
        if fd.check_extension_raw(u64::from(KVM_CAP_EXIT_ON_EMULATION_FAILURE)) > 0 {
            let cap = kvm_enable_cap { cap: KVM_CAP_EXIT_ON_EMULATION_FAILURE, ..Default::default() };
            if let Err(e) = fd.enable_cap(&cap) {
                log::debug!("KVM_CAP_EXIT_ON_EMULATION_FAILURE not enabled: {e}");
            }
        }
        let mut supported_cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("read the supported CPUID"))?;
        if kvm.check_extension(Cap::TscDeadlineTimer) {
            add_tsc_deadline(&mut supported_cpuid);
        }
        Ok(Self { fd: Arc::new(fd), supported_cpuid })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The CPUID KVM supports on this host, before per-vCPU patching.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// Makes a write to `evt` raise the interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(kvm_err("register an irqfd"))
    }
}
