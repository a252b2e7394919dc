//! x86_64 specifics: the guest physical layout, vCPU register and CPUID
//! set-up, Linux boot protocols and the ACPI tables.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod msr;
pub mod regs;
