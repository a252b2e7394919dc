//! MSI interrupts through KVM: every vector is a GSI with an irqfd, routed
//! by the GSI routing table to the MSI address/data the guest programmed.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so [`KvmMsiManager`]
//! keeps it: the default irqchip routes of GSIs 0–23 (PIC and IOAPIC pins,
//! which legacy devices such as COM1 use) plus one MSI route per unmasked
//! vector.
//!
//! A masked vector has no route and its irqfd is *deassigned*: a signal on
//! the eventfd then (a vhost-user backend such as virtiofsd signals it
//! directly, not knowing about the mask) stays in the eventfd's counter.
//! On unmask the route is set and the irqfd assigned again, and KVM, which
//! looks for a pending count when an irqfd is assigned, delivers it: the
//! interrupt is pended while masked and delivered on unmask, as MSI-X says,
//! not lost.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_device::interrupt::{InterruptError, InterruptGroup, InterruptManager, MsiMessage};
use vmm_sys_util::eventfd::EventFd;

/// GSIs below this are the IOAPIC's pins.
const IOAPIC_PINS: u32 = 24;
/// KVM's default routing-table limit.
const MAX_GSI: u32 = 1024;

struct Table {
    msi: BTreeMap<u32, MsiMessage>,
    free: Vec<u32>,
    next: u32,
}

struct Inner {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
}

/// Allocates MSI vectors and keeps KVM's routing table. Cheap to clone:
/// clones share the table.
#[derive(Clone)]
pub struct KvmMsiManager {
    inner: Arc<Inner>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_entry(gsi: u32, msg: &MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

/// The routes of GSIs 0–23 as KVM sets them up by default.
fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 16 {
            let chip = if gsi < 8 { KVM_IRQCHIP_PIC_MASTER } else { KVM_IRQCHIP_PIC_SLAVE };
            v.push(irqchip_entry(gsi, chip, gsi % 8));
        }
        v.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    v
}

impl KvmMsiManager {
    pub fn new(vm: Arc<VmFd>) -> Self {
        let table = Mutex::new(Table { msi: BTreeMap::new(), free: Vec::new(), next: IOAPIC_PINS });
        Self { inner: Arc::new(Inner { vm, table }) }
    }
}

impl Inner {
    fn commit(&self, table: &Table) -> Result<(), InterruptError> {
        let mut entries = legacy_routes();
        entries.extend(table.msi.iter().map(|(gsi, msg)| msi_entry(*gsi, msg)));
        let routing = KvmIrqRouting::from_entries(&entries).map_err(|_| InterruptError::Exhausted)?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| InterruptError::Hypervisor(std::io::Error::from_raw_os_error(e.errno())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl InterruptManager for KvmMsiManager {
    fn create_msi_group(&self, count: usize) -> Result<Arc<dyn InterruptGroup>, InterruptError> {
        let inner = &self.inner;
        let mut vectors = Vec::with_capacity(count);
        let mut table = inner.lock();
        for _ in 0..count {
            let gsi = match table.free.pop() {
                Some(g) => g,
                None if table.next < MAX_GSI => {
                    table.next += 1;
                    table.next - 1
                }
                None => {
                    table.free.extend(vectors.iter().map(|(g, _)| *g));
                    return Err(InterruptError::Exhausted);
                }
            };
            // The irqfd is assigned when the guest unmasks the vector.
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(InterruptError::Hypervisor)?;
            vectors.push((gsi, evt));
        }
        drop(table);
        Ok(Arc::new(KvmMsiGroup { mgr: inner.clone(), vectors }))
    }
}

/// One device's vectors.
struct KvmMsiGroup {
    mgr: Arc<Inner>,
    vectors: Vec<(u32, EventFd)>,
}

impl InterruptGroup for KvmMsiGroup {
    fn len(&self) -> usize {
        self.vectors.len()
    }

    fn trigger(&self, index: usize) -> Result<(), InterruptError> {
        let (_, evt) = self.vectors.get(index).ok_or(InterruptError::InvalidVector(index))?;
        evt.write(1).map_err(InterruptError::Hypervisor)
    }

    fn notifier(&self, index: usize) -> Option<&EventFd> {
        self.vectors.get(index).map(|(_, e)| e)
    }

    fn update(&self, index: usize, msg: MsiMessage, masked: bool) -> Result<(), InterruptError> {
        let (gsi, evt) = self.vectors.get(index).ok_or(InterruptError::InvalidVector(index))?;
        let kvm = |e: kvm_ioctls::Error| InterruptError::Hypervisor(std::io::Error::from_raw_os_error(e.errno()));
        let mut table = self.mgr.lock();
        if masked {
            // A routed vector has its irqfd assigned; take both away, so
            // signals wait in the eventfd until the vector is unmasked.
            if table.msi.remove(gsi).is_some() {
                self.mgr.vm.unregister_irqfd(evt, *gsi).map_err(kvm)?;
                self.mgr.commit(&table)?;
            }
            return Ok(());
        }
        match table.msi.insert(*gsi, msg) {
            Some(old) if old == msg => {}
            Some(_) => self.mgr.commit(&table)?,
            None => {
                self.mgr.commit(&table)?;
                // Assigning the irqfd delivers a signal that arrived while
                // the vector was masked.
                if let Err(e) = self.mgr.vm.register_irqfd(evt, *gsi) {
                    table.msi.remove(gsi);
                    let _ = self.mgr.commit(&table);
                    return Err(kvm(e));
                }
            }
        }
        Ok(())
    }
}

impl Drop for KvmMsiGroup {
    fn drop(&mut self) {
        let mut table = self.mgr.lock();
        for (gsi, evt) in &self.vectors {
            if table.msi.remove(gsi).is_some() {
                let _ = self.mgr.vm.unregister_irqfd(evt, *gsi);
            }
            table.free.push(*gsi);
        }
        let _ = self.mgr.commit(&table);
    }
}

/// Registers queue-notify addresses as KVM ioeventfds, so a guest's notify
/// write signals the device's eventfd without leaving the kernel.
pub struct KvmIoEvents {
    vm: Arc<VmFd>,
}

impl KvmIoEvents {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }
}

impl virtio_devices::IoEventRegistrar for KvmIoEvents {
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_routes_cover_pic_and_ioapic() {
        let r = legacy_routes();
        assert_eq!(r.len(), 16 + 24);
        // SAFETY: reading the union member these entries were built with.
        let pins: Vec<(u32, u32)> = r.iter().map(|e| unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) }).collect();
        assert!(pins.contains(&(KVM_IRQCHIP_PIC_SLAVE, 4))); // GSI 12
        assert!(pins.contains(&(KVM_IRQCHIP_IOAPIC, 23)));
    }

    #[test]
    fn msi_entry_splits_address() {
        let e = msi_entry(30, &MsiMessage { address: 0x1_fee0_1000, data: 0x4041 });
        // SAFETY: reading the union member this entry was built with.
        let (lo, hi, data) = unsafe { (e.u.msi.address_lo, e.u.msi.address_hi, e.u.msi.data) };
        assert_eq!((lo, hi, data, e.type_), (0xfee0_1000, 1, 0x4041, KVM_IRQ_ROUTING_MSI));
    }
}
