//! What a vCPU tells when the VM cannot go on: KVM's internal-error words
//! decoded, the instruction bytes KVM failed on, the guest-physical address
//! of the access and whether it is RAM, and the registers.
//!
//! A one-line guess ("stock kernels cannot boot") tells nobody what broke;
//! these reports carry what KVM knows, so a failure can be placed in the
//! VMM, the guest or the host's KVM.

use std::fmt::Write as _;

use kvm_bindings::{
    kvm_regs, kvm_run, kvm_sregs, KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// SVM exit code of a nested page fault (the GPA is in `exit_info_2`).
const SVM_EXIT_NPF: u64 = 0x400;
/// VMX exit reason of an EPT violation / misconfiguration (the GPA is not
/// in the words KVM reports, only the qualification).
const VMX_EXIT_EPT_VIOLATION: u64 = 48;
const VMX_EXIT_EPT_MISCONFIG: u64 = 49;

/// `KVM_EXIT_INTERNAL_ERROR` as KVM reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InternalError {
    /// `KVM_INTERNAL_ERROR_*`.
    pub suberror: u32,
    /// The data words (at most 16).
    pub data: Vec<u64>,
    /// The instruction bytes KVM could not emulate, when it gave them
    /// (`KVM_CAP_EXIT_ON_EMULATION_FAILURE`).
    pub insn: Option<Vec<u8>>,
}

impl InternalError {
    /// Reads the internal-error exit out of the vCPU's `kvm_run`.
    pub fn from_run(run: &kvm_run) -> Self {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which KVM
        // fills the `internal` member; it is plain integers, so any bit
        // pattern is valid.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let mut data = internal.data[..ndata].to_vec();
        let mut insn = None;
        if internal.suberror == KVM_INTERNAL_ERROR_EMULATION && ndata >= 1 {
            // `emulation_failure` overlays `internal`: word 0 is the flags;
            // with instruction bytes, words 1-2 hold insn_size (the first
            // byte) and 15 instruction bytes. The exit information follows.
            let flags = data[0];
            if flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0 && ndata >= 3 {
                let mut bytes = [0u8; 16];
                bytes[..8].copy_from_slice(&data[1].to_le_bytes());
                bytes[8..].copy_from_slice(&data[2].to_le_bytes());
                let size = usize::from(bytes[0]).min(15);
                insn = Some(bytes[1..1 + size].to_vec());
                data.drain(..3);
            } else {
                data.drain(..1);
            }
        }
        InternalError { suberror: internal.suberror, data, insn }
    }

    /// The suberror's meaning.
    pub fn kind(&self) -> &'static str {
        match self.suberror {
            KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
            KVM_INTERNAL_ERROR_SIMUL_EX => "an exception occurred while delivering another (simultaneous exceptions)",
            KVM_INTERNAL_ERROR_DELIVERY_EV => "an event could not be delivered (exit during event delivery)",
            KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "the hardware reported an exit KVM does not handle",
            _ => "unknown suberror",
        }
    }

    /// The guest-physical address of the faulting access, where the exit
    /// information words carry one: after an emulation failure they are
    /// (exit reason, info1, info2, intr info, error code), and on AMD a
    /// nested page fault has the GPA in info2.
    pub fn gpa(&self) -> Option<u64> {
        match (self.suberror, &self.data[..]) {
            (KVM_INTERNAL_ERROR_EMULATION, [reason, _info1, info2, ..]) if *reason == SVM_EXIT_NPF => Some(*info2),
            _ => None,
        }
    }

    /// The hardware exit reason that led to an emulation failure.
    pub fn exit_reason(&self) -> Option<u64> {
        match self.suberror {
            KVM_INTERNAL_ERROR_EMULATION => self.data.first().copied(),
            _ => None,
        }
    }
}

/// Names a hardware exit code (SVM codes are ≥ 0x40 for most we care about
/// and VMX reasons are small; KVM reports whichever the host CPU uses).
fn exit_name(code: u64) -> &'static str {
    match code {
        SVM_EXIT_NPF => "SVM nested page fault",
        0x7b => "SVM I/O instruction",
        0x60 => "SVM physical interrupt",
        0x40..=0x5f => "SVM exception",
        VMX_EXIT_EPT_VIOLATION => "VMX EPT violation",
        VMX_EXIT_EPT_MISCONFIG => "VMX EPT misconfiguration",
        _ => "exit",
    }
}

/// Whether `gpa` is guest RAM, said in words.
fn gpa_kind(mem: &GuestMemoryMmap, gpa: u64) -> &'static str {
    if mem.address_in_range(GuestAddress(gpa)) {
        "guest RAM (a memory slot: KVM had no reason to emulate this access)"
    } else {
        "not RAM (MMIO or unmapped)"
    }
}

/// Walks the guest's 4- or 5-level page tables for `gva` in guest memory
/// (long mode only): each level's entry, and the guest-physical address if
/// the walk ends at a present entry. Reads only; a table outside RAM ends
/// the walk.
pub fn walk_page_tables(mem: &GuestMemoryMmap, cr3: u64, la57: bool, gva: u64) -> (Vec<u64>, Option<u64>) {
    const PRESENT: u64 = 1;
    const HUGE: u64 = 1 << 7;
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let levels: &[u32] = if la57 { &[48, 39, 30, 21, 12] } else { &[39, 30, 21, 12] };
    let mut table = cr3 & ADDR;
    let mut entries = Vec::new();
    for (i, shift) in levels.iter().enumerate() {
        let index = (gva >> shift) & 0x1ff;
        let Ok(entry) = vm_memory::Bytes::read_obj::<u64>(mem, GuestAddress(table + index * 8)) else {
            return (entries, None);
        };
        entries.push(entry);
        if entry & PRESENT == 0 {
            return (entries, None);
        }
        let last = i == levels.len() - 1;
        // A 1 GiB or 2 MiB page ends the walk early.
        if last || (entry & HUGE != 0 && (*shift == 30 || *shift == 21)) {
            let page_mask = (1u64 << shift) - 1;
            return (entries, Some((entry & ADDR & !page_mask) | (gva & page_mask)));
        }
        table = entry & ADDR;
    }
    (entries, None)
}

/// What the guest's page tables say about the code at RIP, read in guest
/// memory after the failure: each level's entry and the bytes at the
/// address they lead to. Against the instruction bytes KVM reported, this
/// tells whether the guest's mapping changed under KVM's feet or KVM read
/// something else.
pub fn describe_code_at(mem: &GuestMemoryMmap, sregs: &kvm_sregs, rip: u64) -> String {
    const CR0_PG: u64 = 1 << 31;
    const EFER_LMA: u64 = 1 << 10;
    const CR4_LA57: u64 = 1 << 12;
    if sregs.cr0 & CR0_PG == 0 || sregs.efer & EFER_LMA == 0 {
        return format!("code at rip {rip:#x}: not in long mode with paging, no walk");
    }
    let (entries, gpa) = walk_page_tables(mem, sregs.cr3, sregs.cr4 & CR4_LA57 != 0, rip);
    let walk: Vec<String> = entries.iter().map(|e| format!("{e:#x}")).collect();
    let mut s = format!("guest page walk of rip {rip:#x} from cr3: [{}]", walk.join(" -> "));
    match gpa {
        None => s.push_str(": not present"),
        Some(gpa) => {
            let mut bytes = [0u8; 15];
            match vm_memory::Bytes::read_slice(mem, &mut bytes, GuestAddress(gpa)) {
                Ok(()) => s.push_str(&format!(" -> GPA {gpa:#x}: [{}]", hex(&bytes))),
                Err(_) => s.push_str(&format!(" -> GPA {gpa:#x}, outside guest RAM")),
            }
        }
    }
    s
}

/// The full text of an internal-error report.
pub fn describe_internal_error(
    id: u8,
    err: &InternalError,
    regs: Option<&kvm_regs>,
    sregs: Option<&kvm_sregs>,
    mem: &GuestMemoryMmap,
) -> String {
    let mut s = format!("vCPU {id}: KVM internal error {} ({})", err.suberror, err.kind());
    if let Some(code) = err.exit_reason() {
        let _ = write!(s, "; hardware exit {code:#x} ({})", exit_name(code));
    }
    if let Some(gpa) = err.gpa() {
        let _ = write!(s, "; GPA {gpa:#x} is {}", gpa_kind(mem, gpa));
    }
    if let Some(insn) = &err.insn {
        let _ = write!(s, "; instruction bytes [{}]", hex(insn));
    }
    let words: Vec<String> = err.data.iter().map(|w| format!("{w:#x}")).collect();
    let _ = write!(s, "; data [{}]", words.join(", "));
    push_cpu_state(&mut s, regs, sregs);
    s
}

/// The full text of a triple-fault report.
pub fn describe_shutdown(id: u8, regs: Option<&kvm_regs>, sregs: Option<&kvm_sregs>) -> String {
    let mut s = format!("vCPU {id}: triple fault (KVM_EXIT_SHUTDOWN): the guest crashed");
    push_cpu_state(&mut s, regs, sregs);
    if sregs.is_some_and(|sr| sr.cs.selector == 0xf000 && sr.cr0 & 1 == 0) {
        // KVM on AMD re-initialises the VMCB on a shutdown intercept.
        s.push_str("\n  (these are the vCPU's reset values: KVM reinitialised it on the shutdown, the state at the fault is lost)");
    }
    s
}

/// Bytes as spaced hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

fn push_cpu_state(s: &mut String, regs: Option<&kvm_regs>, sregs: Option<&kvm_sregs>) {
    if let Some(r) = regs {
        let _ = write!(
            s,
            "\n  rip={:#018x} rsp={:#018x} rflags={:#x}\n  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  \
             rsi={:#018x} rdi={:#018x} rbp={:#018x} r8={:#018x}\n  r9={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}\n  \
             r13={:#018x} r14={:#018x} r15={:#018x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
            r.r13, r.r14, r.r15
        );
    }
    if let Some(sr) = sregs {
        let _ = write!(
            s,
            "\n  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}(dpl {}) ss={:#x} idt={:#x}/{:#x} gdt={:#x}/{:#x}",
            sr.cr0,
            sr.cr2,
            sr.cr3,
            sr.cr4,
            sr.efer,
            sr.cs.selector,
            sr.cs.dpl,
            sr.ss.selector,
            sr.idt.base,
            sr.idt.limit,
            sr.gdt.base,
            sr.gdt.limit
        );
    }
    if regs.is_none() && sregs.is_none() {
        s.push_str("\n  (registers could not be read)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(suberror: u32, data: &[u64]) -> kvm_run {
        let mut run = kvm_run::default();
        run.__bindgen_anon_1.internal.suberror = suberror;
        run.__bindgen_anon_1.internal.ndata = data.len() as u32;
        // SAFETY: `internal` is the member written just above; it is plain
        // integers.
        unsafe { run.__bindgen_anon_1.internal.data[..data.len()].copy_from_slice(data) };
        run
    }

    #[test]
    fn emulation_failure_with_instruction_bytes() {
        // flags=1, then insn_size=3 in the low byte of word 1 and the bytes
        // after it, then exit reason NPF, info1, info2 = GPA, intr, error.
        let insn_word1 = 3u64 | (0x8bu64 << 8) | (0x07u64 << 16) | (0x90u64 << 24);
        let run = run_with(
            KVM_INTERNAL_ERROR_EMULATION,
            &[1, insn_word1, 0x9090_9090_9090_9090, 0x400, 0x6, 0xfeb0_0000, 0, 0],
        );
        let err = InternalError::from_run(&run);
        assert_eq!(err.insn.as_deref(), Some(&[0x8b, 0x07, 0x90][..]));
        assert_eq!(err.exit_reason(), Some(0x400));
        assert_eq!(err.gpa(), Some(0xfeb0_0000));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let text = describe_internal_error(
            0,
            &err,
            Some(&kvm_regs { rip: 0xffff_ffff_8100_0000, ..Default::default() }),
            None,
            &mem,
        );
        assert!(text.contains("instruction emulation failed"), "{text}");
        assert!(text.contains("8b 07 90"), "{text}");
        assert!(text.contains("GPA 0xfeb00000 is not RAM"), "{text}");
        assert!(text.contains("rip=0xffffffff81000000"), "{text}");
        assert!(!text.contains("PVM"), "{text}");
    }

    #[test]
    fn page_walk_finds_code_and_says_where_it_stops() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let w = |addr: u64, v: u64| vm_memory::Bytes::write_obj(&mem, v, GuestAddress(addr)).unwrap();
        // PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000; code page 0x5000.
        let gva = 0x40_f32f_u64;
        w(0x1000 + ((gva >> 39) & 0x1ff) * 8, 0x2000 | 7);
        w(0x2000 + ((gva >> 30) & 0x1ff) * 8, 0x3000 | 7);
        w(0x3000 + ((gva >> 21) & 0x1ff) * 8, 0x4000 | 7);
        w(0x4000 + ((gva >> 12) & 0x1ff) * 8, 0x5000 | 5);
        vm_memory::Bytes::write_slice(&mem, &[0x0f, 0xa2], GuestAddress(0x532f)).unwrap();
        let sregs = kvm_sregs { cr0: 1 << 31, efer: 1 << 10, cr3: 0x1000, ..Default::default() };
        let text = describe_code_at(&mem, &sregs, gva);
        assert!(text.ends_with("-> GPA 0x532f: [0f a2 00 00 00 00 00 00 00 00 00 00 00 00 00]"), "{text}");
        // The PTE cleared: the walk says where it stopped.
        w(0x4000 + ((gva >> 12) & 0x1ff) * 8, 0);
        let text = describe_code_at(&mem, &sregs, gva);
        assert!(text.ends_with("0x4007 -> 0x0]: not present"), "{text}");
        // A 2 MiB page.
        w(0x3000 + ((gva >> 21) & 0x1ff) * 8, 0x20_0000 | 0x80 | 7);
        assert_eq!(walk_page_tables(&mem, 0x1000, false, gva).1, Some(0x20_0000 | (gva & 0x1f_ffff)));
        let real = kvm_sregs { cr0: 1, ..Default::default() };
        assert!(describe_code_at(&mem, &real, gva).contains("no walk"));
    }

    #[test]
    fn emulation_failure_on_ram_says_so() {
        let run = run_with(KVM_INTERNAL_ERROR_EMULATION, &[0, 0x400, 0x4, 0x2000, 0, 0]);
        let err = InternalError::from_run(&run);
        assert_eq!(err.insn, None);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let text = describe_internal_error(1, &err, None, None, &mem);
        assert!(text.contains("GPA 0x2000 is guest RAM"), "{text}");
        assert!(text.contains("registers could not be read"), "{text}");
    }

    #[test]
    fn other_suberrors_and_garbage_ndata() {
        let mut run = run_with(KVM_INTERNAL_ERROR_DELIVERY_EV, &[0x8000_0e0e, 0x400, 0x2, 0x5000]);
        assert_eq!(InternalError::from_run(&run).gpa(), None);
        assert_eq!(InternalError::from_run(&run).data.len(), 4);
        run.__bindgen_anon_1.internal.ndata = 1000;
        assert_eq!(InternalError::from_run(&run).data.len(), 16);
        let err = InternalError::from_run(&run_with(KVM_INTERNAL_ERROR_SIMUL_EX, &[]));
        assert!(err.kind().contains("simultaneous"));
        assert_eq!(err.gpa(), None);
    }
}
