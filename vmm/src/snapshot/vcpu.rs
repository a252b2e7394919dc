//! A vCPU's state: saved from a stopped vCPU thread's [`Vcpu`], restored
//! into a new one before it first runs.
//!
//! Save order: MP state first (reading it lets KVM process pending INIT/
//! SIPI events, which changes the rest), then the registers, FPU/XSAVE,
//! XCRs, debug registers, LAPIC, TSC frequency, CPUID, MSRs and events.
//! Restore order: CPUID → MP state → regs → sregs → XSAVE → XCRs → debug
//! registers → LAPIC → MSRs → events (events last: they hold what is to be
//! injected on the next entry, which the others would disturb).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use serde::{Deserialize, Serialize};

use crate::vstate::vcpu::Vcpu;

/// Most MSRs read or written per `KVM_GET_MSRS`/`KVM_SET_MSRS` (KVM's own
/// limit is `KVM_MAX_MSR_ENTRIES`, 256).
const MSR_CHUNK: usize = 64;
/// Most MSRs a saved vCPU may carry (the index list is a few hundred).
pub const MAX_MSRS: usize = 2048;
/// How far a restoring host's TSC may run from the saved one before
/// KVM is asked to scale it (in kHz).
const TSC_TOLERANCE_KHZ: u32 = 250;

/// Why a vCPU's state cannot be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU {id}: cannot {what}")]
    Kvm {
        id: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: the saved state has {n} {what}, at most {max} are allowed")]
    TooMany { id: u8, what: &'static str, n: usize, max: usize },
    #[error("vCPU {id}: the snapshot's TSC runs at {saved} kHz, this host's at {host} kHz, and KVM cannot scale it")]
    Tsc {
        id: u8,
        saved: u32,
        host: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// `(index, value)` of every MSR of KVM's index list that could be read.
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency, if KVM knows it (a stable TSC).
    pub tsc_khz: Option<u32>,
}

fn kvm<'a>(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError + 'a {
    move |source| VcpuStateError::Kvm { id, what, source }
}

fn msr_entries(msrs: &[(u32, u64)]) -> Vec<kvm_msr_entry> {
    msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect()
}

/// Reads every MSR of `list` KVM lets the vCPU read. `KVM_GET_MSRS` stops
/// at the first MSR it cannot read; that one is skipped (logged) and the
/// rest read on.
fn save_msrs(vcpu: &Vcpu, list: &[u32]) -> Result<Vec<(u32, u64)>, VcpuStateError> {
    let id = vcpu.id();
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let mut msrs = Msrs::from_entries(&msr_entries(&chunk.iter().map(|&i| (i, 0)).collect::<Vec<_>>()))
            .map_err(|_| VcpuStateError::TooMany { id, what: "MSRs", n: chunk.len(), max: MSR_CHUNK })?;
        let n = vcpu.fd().get_msrs(&mut msrs).map_err(kvm(id, "read the MSRs"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        if n < chunk.len() {
            log::debug!("vCPU {id}: MSR {:#x} cannot be read; not saved", chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(out)
}

/// Saves the state of `vcpu`, whose thread has stopped, after letting KVM
/// finish an instruction whose I/O the VMM already answered.
pub fn save_vcpu(vcpu: &mut Vcpu, msr_list: &[u32]) -> Result<VcpuState, VcpuStateError> {
    vcpu.complete_pending_io();
    let id = vcpu.id();
    let fd = vcpu.fd();
    let mp_state = fd.get_mp_state().map_err(kvm(id, "read the MP state"))?;
    let regs = fd.get_regs().map_err(kvm(id, "read the registers"))?;
    let sregs = fd.get_sregs().map_err(kvm(id, "read the special registers"))?;
    let xsave = fd.get_xsave().map_err(kvm(id, "read the XSAVE area"))?;
    let xcrs = fd.get_xcrs().map_err(kvm(id, "read the XCRs"))?;
    let debug_regs = fd.get_debug_regs().map_err(kvm(id, "read the debug registers"))?;
    let lapic = fd.get_lapic().map_err(kvm(id, "read the LAPIC"))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm(id, "read the CPUID"))?.as_slice().to_vec();
    let msrs = save_msrs(vcpu, msr_list)?;
    let events = vcpu.fd().get_vcpu_events().map_err(kvm(id, "read the pending events"))?;
    Ok(VcpuState { id, cpuid, mp_state, regs, sregs, xsave, xcrs, debug_regs, lapic, msrs, events, tsc_khz })
}

/// Checks the sizes a state file could inflate, before any vCPU exists.
pub fn check_vcpu_state(s: &VcpuState) -> Result<(), VcpuStateError> {
    let id = s.id;
    if s.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(VcpuStateError::TooMany {
            id,
            what: "CPUID entries",
            n: s.cpuid.len(),
            max: KVM_MAX_CPUID_ENTRIES,
        });
    }
    if s.msrs.len() > MAX_MSRS {
        return Err(VcpuStateError::TooMany { id, what: "MSRs", n: s.msrs.len(), max: MAX_MSRS });
    }
    Ok(())
}

/// Gives the new `vcpu` the saved state, in KVM's order (see the module
/// documentation). The TSC frequency is checked first: a host whose TSC
/// runs at another rate scales the guest's, or the restore fails.
pub fn restore_vcpu(vcpu: &Vcpu, s: &VcpuState) -> Result<(), VcpuStateError> {
    check_vcpu_state(s)?;
    let id = vcpu.id();
    let fd = vcpu.fd();
    if let Some(saved) = s.tsc_khz {
        let host = fd.get_tsc_khz().map_err(kvm(id, "read the TSC frequency"))?;
        if host.abs_diff(saved) > TSC_TOLERANCE_KHZ {
            fd.set_tsc_khz(saved).map_err(|source| VcpuStateError::Tsc { id, saved, host, source })?;
            log::info!("vCPU {id}: guest TSC scaled from this host's {host} kHz to the snapshot's {saved} kHz");
        }
    }
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| VcpuStateError::TooMany {
        id,
        what: "CPUID entries",
        n: s.cpuid.len(),
        max: KVM_MAX_CPUID_ENTRIES,
    })?;
    fd.set_cpuid2(&cpuid).map_err(kvm(id, "set the CPUID"))?;
    fd.set_mp_state(s.mp_state).map_err(kvm(id, "set the MP state"))?;
    fd.set_regs(&s.regs).map_err(kvm(id, "set the registers"))?;
    fd.set_sregs(&s.sregs).map_err(kvm(id, "set the special registers"))?;
    // SAFETY: `s.xsave` is a whole `kvm_xsave` (4 KiB, the legacy
    // KVM_SET_XSAVE size) owned by us; KVM reads no more than that struct,
    // as the buffer was read with KVM_GET_XSAVE of the same size.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm(id, "set the XSAVE area"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm(id, "set the XCRs"))?;
    fd.set_debug_regs(&s.debug_regs).map_err(kvm(id, "set the debug registers"))?;
    fd.set_lapic(&s.lapic).map_err(kvm(id, "set the LAPIC"))?;
    for chunk in s.msrs.chunks(MSR_CHUNK) {
        let mut entries = msr_entries(chunk);
        // KVM_SET_MSRS also stops at the first refusal: skip it, go on.
        while !entries.is_empty() {
            let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany {
                id,
                what: "MSRs",
                n: entries.len(),
                max: MSR_CHUNK,
            })?;
            let n = fd.set_msrs(&msrs).map_err(kvm(id, "set the MSRs"))?;
            if n < entries.len() {
                log::warn!("vCPU {id}: KVM refused MSR {:#x}; it keeps its reset value", entries[n].index);
                entries.drain(..=n);
            } else {
                entries.clear();
            }
        }
    }
    fd.set_vcpu_events(&s.events).map_err(kvm(id, "set the pending events"))?;
    Ok(())
}
