//! CPUID for each vCPU, derived from `KVM_GET_SUPPORTED_CPUID`.
//!
//! The VM exposes `n` vCPUs as one socket of `n` cores with one thread each.
//! Every vCPU gets the supported set with its own APIC ID patched into the
//! topology leaves (0x1, 0x4, 0xb/0x1f, 0x8000_0008), the hypervisor bit
//! set, and the features that would make the guest probe hardware we do not
//! emulate (the PMU, AMD's extended topology) removed. KVM's in-kernel
//! TSC-deadline timer is advertised ([`add_tsc_deadline`]).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const EBX_APIC_ID_SHIFT: u32 = 24;
const EBX_LOGICAL_COUNT_SHIFT: u32 = 16;
const EBX_CLFLUSH_SHIFT: u32 = 8;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_TOPOEXT: u32 = 1 << 22;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// The number of bits needed to hold `count` distinct IDs.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Advertises the TSC-deadline timer (leaf 0x1 ECX bit 24), which KVM's
/// in-kernel LAPIC emulates (`KVM_CAP_TSC_DEADLINE_TIMER`) but
/// `KVM_GET_SUPPORTED_CPUID` does not list. Without it Linux calibrates its
/// LAPIC timer against the PIT for 100 ms of guest time at boot; QEMU,
/// Firecracker and Cloud Hypervisor set the bit too.
pub fn add_tsc_deadline(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 0x1) {
        entry.ecx |= ECX_TSC_DEADLINE;
    }
}

/// Patches `cpuid` (the supported set) for vCPU `cpu_id` of `cpu_count`.
pub fn filter_cpuid(cpuid: &mut CpuId, cpu_id: u8, cpu_count: u8) {
    let count = u32::from(cpu_count);
    let apic_id = u32::from(cpu_id);
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, apic_id, count);
    }
}

fn patch_entry(entry: &mut kvm_cpuid_entry2, apic_id: u32, count: u32) {
    match entry.function {
        0x1 => {
            entry.ebx = (apic_id << EBX_APIC_ID_SHIFT)
                | (count.next_power_of_two().min(255) << EBX_LOGICAL_COUNT_SHIFT)
                | (8 << EBX_CLFLUSH_SHIFT)
                | (entry.ebx & 0xff);
            entry.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        0x4 => {
            // Deterministic cache parameters: cores per package in 31:26,
            // threads sharing this cache in 25:14.
            let cache_level = (entry.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { count } else { 1 };
            entry.eax &= 0x3fff;
            entry.eax |= (count - 1) << 26;
            entry.eax |= (sharing - 1) << 14;
        }
        0x6 => {
            // No thermal/power management MSRs are emulated.
            entry.ecx &= !(1 << 3); // EPB
        }
        0xa => {
            // No virtual PMU: the guest skips perf counter set-up.
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        0xb | 0x1f => {
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
                }
                1 => {
                    entry.eax = id_bits(count);
                    entry.ebx = count;
                    entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        0x8000_0001 => {
            entry.ecx &= !ECX_TOPOEXT;
        }
        0x8000_0008 => {
            // AMD: number of cores - 1 in 7:0, APIC ID size in 15:12.
            entry.ecx = (id_bits(count) << 12) | (count - 1);
        }
        0x8000_001e => {
            entry.eax = apic_id;
            entry.ebx = apic_id & 0xff;
            entry.ecx = 0;
            entry.edx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ..Default::default() }
    }

    fn cpuid_with(entries: &[kvm_cpuid_entry2]) -> CpuId {
        CpuId::from_entries(entries).unwrap()
    }

    #[test]
    fn apic_ids_and_counts_follow_the_vcpu() {
        let mut c = cpuid_with(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)]);
        filter_cpuid(&mut c, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!((e[1].edx, e[1].ebx, e[1].ecx >> 8), (3, 1, LEVEL_TYPE_SMT));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 4, LEVEL_TYPE_CORE));
        assert_eq!(e[3].ecx >> 8, 0);
    }

    #[test]
    fn tsc_deadline_is_added_to_leaf_1_only() {
        let mut c = cpuid_with(&[entry(1, 0), entry(7, 0)]);
        add_tsc_deadline(&mut c);
        assert_ne!(c.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(c.as_slice()[1].ecx, 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(8), 3);
        assert_eq!(id_bits(9), 4);
    }

    #[test]
    fn pmu_is_hidden_and_single_cpu_has_no_htt() {
        let mut c = cpuid_with(&[entry(1, 0), entry(0xa, 0)]);
        c.as_mut_slice()[0].edx = EDX_HTT;
        c.as_mut_slice()[1].eax = 0x0803_0002;
        filter_cpuid(&mut c, 0, 1);
        assert_eq!(c.as_slice()[0].edx & EDX_HTT, 0);
        assert_eq!(c.as_slice()[1].eax, 0);
    }
}
