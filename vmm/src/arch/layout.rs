//! The guest physical address map.
//!
//! ```text
//! 0x0000_0000  ┬ low RAM (real-mode area, boot structures)
//! 0x0000_0500  │   GDT, then IDT (0x520)
//! 0x0000_6000  │   PVH hvm_start_info, module list (0x6040)
//! 0x0000_7000  │   bzImage zero page (boot_params) / PVH memory map
//! 0x0000_9000  │   identity page tables (PML4, PDPT 0xa000, PD 0xb000)
//! 0x0002_0000  │   kernel command line
//! 0x0009_fc00  ┼ EBDA / legacy hole (reserved in e820)
//! 0x000e_0000  │   ACPI tables (RSDP first)
//! 0x000f_f000  │   VM generation ID (16 bytes)
//! 0x0010_0000  ┼ RAM: kernel at 1 MiB, initramfs at the top of low RAM
//! 0xc000_0000  ┼ 32-bit MMIO hole (1 GiB): PCI BARs, ECAM, IOAPIC, LAPIC
//! 0x1_0000_0000┼ RAM above 4 GiB when the guest has more than 3 GiB
//!              ┼ memory hot-plug region (virtio-mem; not in e820), from
//!              │   4 GiB or the end of RAM, 128 MiB aligned
//!              ┼ 64-bit PCI BAR window (1 GiB aligned)
//! ```

use vm_memory::GuestAddress;

/// GDT used while booting.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT used while booting (empty).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map, right after the module list.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux zero page (`boot_params`) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack of the boot vCPU (grows down from here).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 of the identity map.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages covering the first GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line Linux accepts on x86 (`COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the EBDA: low RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the BIOS area.
pub const ACPI_START: u64 = 0xe0000;
/// End of the BIOS area.
pub const ACPI_END: u64 = 0x10_0000;
/// The VM generation ID (16 bytes, see [`crate::devices::vmgenid`]), in
/// the BIOS area's last page; the ACPI tables end below it.
pub const VMGENID_START: u64 = 0xf_f000;
/// Where the kernel is loaded (1 MiB), and where usable high RAM starts.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// 32-bit PCI BAR window (start, size): the bottom half of the hole.
pub const PCI_MMIO32: (u64, u64) = (MMIO_HOLE_START, 0x2000_0000);
/// PCI ECAM (memory-mapped configuration space), bus 0 only.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Size of the ECAM window for one bus.
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// PCI I/O port window for I/O BARs (start, size).
pub const PCI_IO: (u64, u64) = (0x1000, 0xf000);
/// Size of the 64-bit PCI BAR window placed above RAM.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;

/// Alignment of the memory hot-plug region: Linux's memory block size (the
/// unit it adds and onlines memory in) on small x86 guests.
pub const HOTPLUG_ALIGN: u64 = 128 << 20;
/// The virtio-mem block size: what the guest plugs and unplugs at a time
/// (a huge page; Linux then works in sub-blocks of its memory blocks).
pub const HOTPLUG_BLOCK_SIZE: u64 = 2 << 20;

/// End of boot RAM.
fn ram_end(mem_size: u64) -> u64 {
    ram_ranges(mem_size).last().map_or(0, |(a, s)| a.0 + s)
}

/// The memory hot-plug region (start, size) for `hotplug_size` bytes, if
/// any: above boot RAM and above 4 GiB, [`HOTPLUG_ALIGN`]ed. Never in the
/// gap below the 32-bit hole, which Linux hands out to PCI resources
/// (`e820: [mem ...] available for PCI devices`).
pub fn hotplug_region(mem_size: u64, hotplug_size: u64) -> Option<(u64, u64)> {
    (hotplug_size > 0).then(|| (ram_end(mem_size).max(MMIO_HOLE_END).next_multiple_of(HOTPLUG_ALIGN), hotplug_size))
}

/// The 64-bit PCI BAR window (start, size): above all RAM and the memory
/// hot-plug region, 1 GiB aligned.
pub fn pci_mmio64(mem_size: u64, hotplug_size: u64) -> (u64, u64) {
    let end = hotplug_region(mem_size, hotplug_size).map_or(ram_end(mem_size), |(a, s)| a + s);
    (end.max(MMIO_HOLE_END).next_multiple_of(1 << 30), PCI_MMIO64_SIZE)
}

/// Platform devices of the VMM (below the IOAPIC): the ACPI Generic Event
/// Device's register.
pub const GED_START: u64 = 0xfe00_0000;
/// The ACPI PCI hot-plug registers.
pub const PCI_HOTPLUG_START: u64 = 0xfe00_1000;
/// The ACPI CPU hot-plug registers.
pub const CPU_HOTPLUG_START: u64 = 0xfe00_2000;
/// GSI of the Generic Event Device (an IOAPIC pin nothing else uses).
pub const GED_IRQ: u32 = 5;

/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs' MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;

/// TSS address KVM needs on Intel (three pages just below the BIOS ROM).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Serial port COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// IRQ (GSI) of COM1.
pub const COM1_IRQ: u32 = 4;
/// i8042 controller (data 0x60, command/status 0x64).
pub const I8042_PORT: u16 = 0x60;
/// Boot-complete debug port, as Firecracker's: a guest write of
/// [`BOOT_COMPLETE_MAGIC`] marks the end of boot.
pub const BOOT_DEBUG_PORT: u16 = 0x3f0;
/// The value a guest writes to [`BOOT_DEBUG_PORT`].
pub const BOOT_COMPLETE_MAGIC: u8 = 123;
/// ACPI sleep control, sleep status and reset registers (hardware-reduced
/// ACPI, FADT `SLEEP_CONTROL_REG`, `SLEEP_STATUS_REG`, `RESET_REG`).
pub const ACPI_PM_PORT: u16 = 0x600;
/// Length of the ACPI register block.
pub const ACPI_PM_LEN: u64 = 3;

/// The RAM ranges (guest address, size) for `mem_size` bytes of memory:
/// everything below the MMIO hole first, the rest from 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    let low = mem_size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if mem_size > MMIO_HOLE_START {
        ranges.push((GuestAddress(MMIO_HOLE_END), mem_size - MMIO_HOLE_START));
    }
    ranges
}

/// One entry of the e820 map the guest is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// e820 entry types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

/// The e820 map for `mem_size` bytes of RAM: low RAM up to the EBDA, the
/// BIOS area (ACPI tables) and the PCI ECAM window reserved, RAM from
/// 1 MiB to the hole, and RAM above 4 GiB; sorted by address.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry { addr: 0, size: EBDA_START, kind: E820Kind::Ram },
        E820Entry { addr: EBDA_START, size: ACPI_END - EBDA_START, kind: E820Kind::Reserved },
    ];
    map.push(E820Entry { addr: PCI_ECAM_START, size: PCI_ECAM_SIZE, kind: E820Kind::Reserved });
    for (start, size) in ram_ranges(mem_size) {
        let (start, size) =
            if start.0 == 0 { (HIMEM_START, size.saturating_sub(HIMEM_START)) } else { (start.0, size) };
        if size > 0 {
            map.push(E820Entry { addr: start, size, kind: E820Kind::Ram });
        }
    }
    map.sort_by_key(|e| e.addr);
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_ram_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let map = e820_map(256 << 20);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2], E820Entry { addr: HIMEM_START, size: (256 << 20) - HIMEM_START, kind: E820Kind::Ram });
    }

    #[test]
    fn hotplug_region_is_above_4g_and_ram_and_below_the_pci_window() {
        assert_eq!(hotplug_region(512 << 20, 0), None);
        assert_eq!(pci_mmio64(512 << 20, 0), (MMIO_HOLE_END, PCI_MMIO64_SIZE));
        assert_eq!(hotplug_region(512 << 20, 2 << 30), Some((MMIO_HOLE_END, 2 << 30)));
        assert_eq!(pci_mmio64(512 << 20, 2 << 30).0, MMIO_HOLE_END + (2 << 30));
        // Boot RAM above 4 GiB: the region follows it, 128 MiB aligned.
        let boot = (3 << 30) + (100 << 20);
        assert_eq!(hotplug_region(boot, 256 << 20), Some((MMIO_HOLE_END + (128 << 20), 256 << 20)));
        assert_eq!(pci_mmio64(boot, 256 << 20).0, 5 << 30);
        // The region is never RAM in the e820 map.
        let (start, size) = hotplug_region(boot, 256 << 20).unwrap();
        assert!(e820_map(boot).iter().all(|e| e.addr + e.size <= start || e.addr >= start + size));
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let mem = 4u64 << 30;
        let r = ram_ranges(mem);
        assert_eq!(r, vec![(GuestAddress(0), MMIO_HOLE_START), (GuestAddress(MMIO_HOLE_END), 1 << 30)]);
        let total: u64 = e820_map(mem).iter().filter(|e| e.kind == E820Kind::Ram).map(|e| e.size).sum();
        assert_eq!(total, mem - (HIMEM_START - EBDA_START));
    }
}
