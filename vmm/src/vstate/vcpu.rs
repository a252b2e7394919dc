//! vCPUs: creation, initial state, and the run loop on each vCPU's thread.
//!
//! A vCPU thread runs `KVM_RUN` until an exit needs the VMM: port and MMIO
//! accesses go to the buses, system events and failures end the VM through
//! [`ExitState`]. The loop returns when the vCPU cannot go on; the main
//! loop ends the process, which stops the other vCPUs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_device::Bus;
use vm_memory::GuestMemoryMmap;

use super::report::{describe_code_at, describe_internal_error, describe_shutdown, InternalError};
use super::vm::Vm;
use crate::arch::cpuid::filter_cpuid;
use crate::arch::msr::boot_msrs;
use crate::arch::regs::{boot_fpu, boot_regs, set_lint, setup_sregs, BootEntry, RegsError};
use crate::exit::{ExitReason, ExitState};

static EXITS: AtomicU64 = AtomicU64::new(0);

/// VM exits handled by the VMM (port/MMIO accesses and events) so far, all
/// vCPUs together. Exits KVM handles in the kernel are not counted.
pub fn exit_count() -> u64 {
    EXITS.load(Ordering::Relaxed)
}

/// Errors while creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot {what} of vCPU {id}")]
    Kvm {
        id: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM accepted only {set} of {total} boot MSRs")]
    Msrs { id: u8, set: usize, total: usize },
    #[error("cannot set up the boot registers")]
    Regs(#[source] RegsError),
}

/// One vCPU and what its exits are dispatched to.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    exit: Arc<ExitState>,
    /// Guest RAM, to tell in a failure report whether an address is RAM.
    mem: GuestMemoryMmap,
}

impl Vcpu {
    /// Creates vCPU `id`.
    pub fn new(
        vm: &Vm,
        id: u8,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        exit: Arc<ExitState>,
        mem: GuestMemoryMmap,
    ) -> Result<Self, VcpuError> {
        let fd = vm.fd().create_vcpu(u64::from(id)).map_err(|source| VcpuError::Kvm { id, what: "create", source })?;
        Ok(Self { id, fd, io_bus, mmio_bus, exit, mem })
    }

    fn kvm(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError + '_ {
        move |source| VcpuError::Kvm { id: self.id, what, source }
    }

    /// Sets CPUID, MSRs, FPU and LAPIC; the boot vCPU (the one given
    /// `entry`) also gets its registers. Application processors wait for the
    /// guest's INIT/SIPI in the in-kernel LAPIC.
    pub fn configure(
        &self,
        supported: &CpuId,
        cpu_count: u8,
        mem: &GuestMemoryMmap,
        entry: Option<BootEntry>,
    ) -> Result<(), VcpuError> {
        let mut cpuid = supported.clone();
        filter_cpuid(&mut cpuid, self.id, cpu_count);
        self.fd.set_cpuid2(&cpuid).map_err(self.kvm("set the CPUID"))?;
        let msrs = boot_msrs();
        let set = self.fd.set_msrs(&msrs).map_err(self.kvm("set the MSRs"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs { id: self.id, set, total: msrs.as_slice().len() });
        }
        self.fd.set_fpu(&boot_fpu()).map_err(self.kvm("set the FPU state"))?;
        let mut lapic = self.fd.get_lapic().map_err(self.kvm("read the LAPIC"))?;
        set_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(self.kvm("set the LAPIC"))?;
        if let Some(entry) = entry {
            let mut sregs = self.fd.get_sregs().map_err(self.kvm("read the special registers"))?;
            setup_sregs(mem, entry, &mut sregs).map_err(VcpuError::Regs)?;
            self.fd.set_sregs(&sregs).map_err(self.kvm("set the special registers"))?;
            self.fd.set_regs(&boot_regs(entry)).map_err(self.kvm("set the registers"))?;
        }
        Ok(())
    }

    /// Runs the vCPU until it cannot go on; the reason is in `ExitState`.
    pub fn run(mut self) {
        loop {
            if let Some(reason) = self.run_once() {
                self.exit.request(reason);
                return;
            }
        }
    }

    /// One `KVM_RUN`. Returns why the VM must stop, if it must.
    fn run_once(&mut self) -> Option<ExitReason> {
        let id = self.id;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return None,
            Err(e) => return Some(ExitReason::Error(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        };
        EXITS.fetch_add(1, Ordering::Relaxed);
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !self.io_bus.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                None
            }
            VcpuExit::IoOut(port, data) => {
                if !self.io_bus.write(u64::from(port), data) {
                    log::trace!("vCPU {id}: write to unclaimed port {port:#x}");
                }
                None
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.mmio_bus.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !self.mmio_bus.write(addr, data) {
                    log::debug!("vCPU {id}: write to unclaimed MMIO address {addr:#x}");
                }
                None
            }
            // With the in-kernel LAPIC, HLT is handled by KVM; an exit here
            // only means the vCPU may run again.
            VcpuExit::Hlt | VcpuExit::IrqWindowOpen => None,
            VcpuExit::Shutdown => {
                let (regs, sregs) = (self.fd.get_regs().ok(), self.fd.get_sregs().ok());
                let mut text = describe_shutdown(id, regs.as_ref(), sregs.as_ref());
                if let (Some(r), Some(sr)) = (&regs, &sregs) {
                    text.push_str("\n  ");
                    text.push_str(&describe_code_at(&self.mem, sr, r.rip));
                }
                Some(ExitReason::Error(text))
            }
            VcpuExit::FailEntry(reason, cpu) => Some(ExitReason::Error(format!(
                "vCPU {id}: VM entry failed on host CPU {cpu} (hardware reason {reason:#x})"
            ))),
            VcpuExit::InternalError => {
                let err = InternalError::from_run(self.fd.get_kvm_run());
                let (regs, sregs) = (self.fd.get_regs().ok(), self.fd.get_sregs().ok());
                let mut text = describe_internal_error(id, &err, regs.as_ref(), sregs.as_ref(), &self.mem);
                if let (Some(r), Some(sr)) = (&regs, &sregs) {
                    text.push_str("\n  ");
                    text.push_str(&describe_code_at(&self.mem, sr, r.rip));
                }
                if crate::vstate::vm::host_is_pvm() {
                    text.push_str(
                        "\n  (this host's KVM is KVM-PVM, which cannot run stock guest kernels; see tests/box/kvm-box)",
                    );
                }
                Some(ExitReason::Error(text))
            }
            VcpuExit::SystemEvent(kind, _) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::PowerOff),
                KVM_SYSTEM_EVENT_RESET => Some(ExitReason::Reset),
                KVM_SYSTEM_EVENT_CRASH => Some(ExitReason::GuestPanic("crash event from the guest".into())),
                other => Some(ExitReason::Error(format!("vCPU {id}: unknown system event {other}"))),
            },
            other => Some(ExitReason::Error(format!("vCPU {id}: unhandled VM exit {other:?}"))),
        }
    }
}
