//! KVM state: the VM file descriptor with its memory and irqchip, and the
//! vCPUs with their run loops.

pub mod report;
pub mod vcpu;
pub mod vcpu_thread;
pub mod vm;
