//! Initial register state of the boot vCPU for each boot protocol, and the
//! local APIC set-up every vCPU needs.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{gdt_entry, kvm_segment_from_gdt};
use super::layout::*;

/// Errors while writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A boot structure could not be written (guest memory too small).
    #[error("cannot write the boot {what} into guest memory")]
    Write {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = `hvm_start_info`.
    Pvh(GuestAddress),
    /// Linux 64-bit boot protocol: long mode with an identity map,
    /// `%rsi` = zero page.
    Linux64(GuestAddress),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// FPU state after reset: x87 control word 0x37f, SSE control 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// General registers for `entry`.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match entry {
        BootEntry::Pvh(rip) => {
            regs.rip = rip.raw_value();
            regs.rbx = PVH_INFO_START;
        }
        BootEntry::Linux64(rip) => {
            regs.rip = rip.raw_value();
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    regs
}

/// Writes the GDT/IDT (and for 64-bit boot the page tables) into guest
/// memory and fills the segment and control registers of `sregs`.
pub fn setup_sregs(mem: &GuestMemoryMmap, entry: BootEntry, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    let gdt: [u64; 4] = match entry {
        BootEntry::Pvh(_) => [
            0,
            gdt_entry(0xc09b, 0, 0xffff_ffff), // 32-bit code
            gdt_entry(0xc093, 0, 0xffff_ffff), // data
            gdt_entry(0x008b, 0, 0x67),        // TSS
        ],
        BootEntry::Linux64(_) => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS
        ],
    };
    for (i, e) in gdt.iter().enumerate() {
        write(mem, BOOT_GDT_START + (i as u64) * 8, *e, "GDT")?;
    }
    write(mem, BOOT_IDT_START, 0u64, "IDT")?;

    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match entry {
        BootEntry::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64(_) => {
            setup_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    Ok(())
}

/// Identity-maps the first GiB with 2 MiB pages.
fn setup_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    write(mem, PML4_START, PDPTE_START | 0x03, "page tables")?;
    write(mem, PDPTE_START, PDE_START | 0x03, "page tables")?;
    for i in 0..512u64 {
        write(mem, PDE_START + i * 8, (i << 21) | 0x83, "page tables")?;
    }
    Ok(())
}

fn write(mem: &GuestMemoryMmap, addr: u64, val: u64, what: &'static str) -> Result<(), RegsError> {
    mem.write_obj(val, GuestAddress(addr)).map_err(|source| RegsError::Write { what, source })
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}

/// Routes LINT0 to ExtINT (the PIC) and LINT1 to NMI, as firmware would.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn long_mode_boot_maps_first_gib() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_sregs(&m, BootEntry::Linux64(GuestAddress(0x100200)), &mut s).unwrap();
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_eq!(s.cs.l, 1);
        let pde511: u64 = m.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(pde511, (511 << 21) | 0x83);
    }

    #[test]
    fn pvh_boot_is_flat_protected_mode() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_sregs(&m, BootEntry::Pvh(GuestAddress(0x1000000)), &mut s).unwrap();
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((s.cs.db, s.cs.l, s.cs.limit), (1, 0, 0xffff_ffff));
        let r = boot_regs(BootEntry::Pvh(GuestAddress(0x1000000)));
        assert_eq!((r.rip, r.rbx), (0x1000000, PVH_INFO_START));
    }

    #[test]
    fn lint_modes() {
        let mut l = kvm_lapic_state::default();
        set_lint(&mut l);
        assert_eq!((lapic_reg(&l, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((lapic_reg(&l, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
