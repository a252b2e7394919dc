//! The VM-wide state KVM holds: the in-kernel irqchip (PIC master and
//! slave, IOAPIC), the PIT and kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Why the VM-wide state cannot be saved or restored.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what}")]
pub struct VmStateError {
    what: &'static str,
    #[source]
    source: kvm_ioctls::Error,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError { what, source }
}

/// The irqchip, PIT and clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn chip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmStateError> {
    let mut c = kvm_irqchip { chip_id, ..Default::default() };
    fd.get_irqchip(&mut c).map_err(kvm("read the in-kernel irqchip"))?;
    Ok(c)
}

/// Reads the state of the VM `fd` (its vCPUs stopped).
pub fn save_vm(fd: &VmFd) -> Result<VmState, VmStateError> {
    Ok(VmState {
        pic_master: chip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: fd.get_pit2().map_err(kvm("read the PIT"))?,
        clock: fd.get_clock().map_err(kvm("read kvmclock"))?,
    })
}

/// Gives the new VM `fd` the saved state; call before any vCPU runs. The
/// guest's kvmclock goes on from the saved value (the guest does not see
/// the time it spent saved: its wall clock is behind by that much).
pub fn restore_vm_state(fd: &VmFd, s: &VmState) -> Result<(), VmStateError> {
    for (c, id) in [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        let mut c = *c;
        c.chip_id = id;
        fd.set_irqchip(&c).map_err(kvm("set the in-kernel irqchip"))?;
    }
    fd.set_pit2(&s.pit).map_err(kvm("set the PIT"))?;
    // Only the clock value is restored: the flags KVM reports (a stable
    // TSC, the realtime fields) describe the old host.
    let clock = kvm_clock_data { clock: s.clock.clock, ..Default::default() };
    fd.set_clock(&clock).map_err(kvm("set kvmclock"))?;
    Ok(())
}
