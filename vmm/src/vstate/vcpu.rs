//! vCPUs: creation, initial state, and one `KVM_RUN` with the dispatch of
//! its exit. Port and MMIO accesses go to the buses; system events and
//! failures become an [`ExitReason`]. The thread that runs a vCPU, and how
//! the VMM pauses, resumes and stops it, is [`super::vcpu_thread`].

use std::collections::BTreeMap;
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

/// VM exits handled by the VMM, by kind, all vCPUs of a VM together. Exits
/// KVM handles in the kernel are not counted.
#[derive(Debug, Default)]
pub struct ExitCounters {
    io_in: AtomicU64,
    io_out: AtomicU64,
    mmio_read: AtomicU64,
    mmio_write: AtomicU64,
    other: AtomicU64,
}

impl ExitCounters {
    /// The counts by name, for the control API.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        [
            ("io_in", &self.io_in),
            ("io_out", &self.io_out),
            ("mmio_read", &self.mmio_read),
            ("mmio_write", &self.mmio_write),
            ("other", &self.other),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed)))
        .collect()
    }

    /// All exits together.
    pub fn total(&self) -> u64 {
        self.snapshot().values().sum()
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Why a vCPU cannot go on. The reports carry the registers and the code
/// at the instruction pointer where KVM gives them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VcpuRunError {
    #[error("vCPU {id}: KVM_RUN failed: {}", std::io::Error::from_raw_os_error(*errno))]
    KvmRun { id: u8, errno: i32 },
    /// A triple fault (KVM's shutdown exit).
    #[error("{report}")]
    TripleFault { id: u8, report: String },
    #[error("vCPU {id}: VM entry failed on host CPU {cpu} (hardware reason {reason:#x})")]
    FailEntry { id: u8, reason: u64, cpu: u32 },
    /// KVM could not emulate or deliver something (emulation failure,
    /// delivery of an event during event delivery, ...).
    #[error("{report}")]
    Internal { id: u8, report: String },
    #[error("vCPU {id}: unknown system event {kind}")]
    UnknownSystemEvent { id: u8, kind: u32 },
    #[error("vCPU {id}: unhandled VM exit {exit}")]
    UnhandledExit { id: u8, exit: String },
}

/// What one `KVM_RUN` came to.
#[derive(Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The exit was handled; run again.
    Continue,
    /// `KVM_RUN` was interrupted (a kick): look at the thread's requests.
    Interrupted,
    /// The VM must stop.
    Stop(ExitReason),
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

/// What every vCPU of a VM shares: the buses its exits go to, the exit
/// slot, the counters, and guest RAM (to tell in a failure report whether
/// an address is RAM).
#[derive(Clone)]
pub struct VcpuContext {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub exit: Arc<ExitState>,
    pub counters: Arc<ExitCounters>,
    pub mem: GuestMemoryMmap,
}

/// One vCPU and what its exits are dispatched to.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    ctx: VcpuContext,
}

impl Vcpu {
    /// Creates vCPU `id`.
    pub fn new(vm: &Vm, id: u8, ctx: VcpuContext) -> Result<Self, VcpuError> {
        let fd = vm.fd().create_vcpu(u64::from(id)).map_err(|source| VcpuError::Kvm { id, what: "create", source })?;
        Ok(Self { id, fd, ctx })
    }

    /// The vCPU's id (its APIC ID).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The KVM vCPU, for saving and restoring its state.
    pub(crate) fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs `KVM_RUN` with `immediate_exit` set: KVM completes an I/O or
    /// MMIO instruction the VMM has answered but the guest has not retired
    /// yet, and returns at once. Done before the state is saved, so that
    /// a restored vCPU does not repeat the access.
    pub(crate) fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => log::warn!("vCPU {}: completing pending I/O: {e}", self.id),
            Ok(exit) => log::warn!("vCPU {}: unexpected exit while completing pending I/O: {exit:?}", self.id),
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// The `kvm_run` area, for the kick signal handler.
    pub(super) fn kvm_run_ptr(&mut self) -> *mut kvm_bindings::kvm_run {
        self.fd.get_kvm_run()
    }

    /// Records why the VM must stop and wakes the main loop.
    pub(super) fn request_exit(&self, reason: ExitReason) {
        self.ctx.exit.request(reason);
    }

    /// Clears `immediate_exit` after a kick was seen.
    pub(super) fn clear_immediate_exit(&mut self) {
        self.fd.set_kvm_immediate_exit(0);
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

    /// One `KVM_RUN` and the handling of its exit.
    pub fn run_once(&mut self) -> RunOutcome {
        match self.step() {
            Ok(None) => RunOutcome::Continue,
            Ok(Some(reason)) => RunOutcome::Stop(reason),
            Err(()) => RunOutcome::Interrupted,
        }
    }

    /// `Err(())`: interrupted; `Ok(Some(_))`: the VM must stop.
    fn step(&mut self) -> Result<Option<ExitReason>, ()> {
        let id = self.id;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Err(()),
            Err(e) => return Ok(Some(VcpuRunError::KvmRun { id, errno: e.errno() }.into())),
        };
        let c = &self.ctx.counters;
        Ok(match exit {
            VcpuExit::IoIn(port, data) => {
                bump(&c.io_in);
                if !self.ctx.io_bus.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                None
            }
            VcpuExit::IoOut(port, data) => {
                bump(&c.io_out);
                if !self.ctx.io_bus.write(u64::from(port), data) {
                    log::trace!("vCPU {id}: write to unclaimed port {port:#x}");
                }
                None
            }
            VcpuExit::MmioRead(addr, data) => {
                bump(&c.mmio_read);
                if !self.ctx.mmio_bus.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            VcpuExit::MmioWrite(addr, data) => {
                bump(&c.mmio_write);
                if !self.ctx.mmio_bus.write(addr, data) {
                    log::debug!("vCPU {id}: write to unclaimed MMIO address {addr:#x}");
                }
                None
            }
            // With the in-kernel LAPIC, HLT is handled by KVM; an exit here
            // only means the vCPU may run again.
            VcpuExit::Hlt | VcpuExit::IrqWindowOpen => {
                bump(&c.other);
                None
            }
            VcpuExit::Shutdown => {
                bump(&c.other);
                let (regs, sregs) = (self.fd.get_regs().ok(), self.fd.get_sregs().ok());
                let mut text = describe_shutdown(id, regs.as_ref(), sregs.as_ref());
                if let (Some(r), Some(sr)) = (&regs, &sregs) {
                    text.push_str("\n  ");
                    text.push_str(&describe_code_at(&self.ctx.mem, sr, r.rip));
                }
                Some(VcpuRunError::TripleFault { id, report: text }.into())
            }
            VcpuExit::FailEntry(reason, cpu) => Some(VcpuRunError::FailEntry { id, reason, cpu }.into()),
            VcpuExit::InternalError => {
                let err = InternalError::from_run(self.fd.get_kvm_run());
                let (regs, sregs) = (self.fd.get_regs().ok(), self.fd.get_sregs().ok());
                let mut text = describe_internal_error(id, &err, regs.as_ref(), sregs.as_ref(), &self.ctx.mem);
                if let (Some(r), Some(sr)) = (&regs, &sregs) {
                    text.push_str("\n  ");
                    text.push_str(&describe_code_at(&self.ctx.mem, sr, r.rip));
                }
                if crate::vstate::vm::host_is_pvm() {
                    text.push_str(
                        "\n  (this host's KVM is KVM-PVM, which cannot run stock guest kernels; see tests/box/kvm-box)",
                    );
                }
                Some(VcpuRunError::Internal { id, report: text }.into())
            }
            VcpuExit::SystemEvent(kind, _) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::PowerOff),
                KVM_SYSTEM_EVENT_RESET => Some(ExitReason::Reset),
                KVM_SYSTEM_EVENT_CRASH => Some(ExitReason::GuestPanic("crash event from the guest".into())),
                kind => Some(VcpuRunError::UnknownSystemEvent { id, kind }.into()),
            },
            other => Some(VcpuRunError::UnhandledExit { id, exit: format!("{other:?}") }.into()),
        })
    }
}
