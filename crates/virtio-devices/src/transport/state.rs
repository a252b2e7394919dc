//! Saving a virtio-pci function's state for a snapshot and restoring it
//! into a fresh function (see [`crate::state`] for what is carried).

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueState, QueueT};

use super::common_config::{CommonConfig, QueueSlot};
use super::{lock, VirtioPciDevice};
use crate::state::{
    CommonConfigState, QueueSlotState, StateError, VirtioPciState, DEVICE_CONFIG_BYTES,
};

impl VirtioPciDevice {
    /// The function's state, for a snapshot. Call with the VM paused: an
    /// active device reports where its worker left each queue (see
    /// [`crate::VirtioDevice::queue_progress`]; a device that cannot
    /// refuses).
    pub fn save_state(&mut self) -> Result<VirtioPciState, StateError> {
        let (progress, backend_state) = if self.active {
            let mut dev = lock(&self.device);
            let progress = dev.queue_progress()?;
            (progress, dev.backend_state())
        } else {
            (Vec::new(), None)
        };
        let c = &self.common;
        Ok(VirtioPciState {
            config: self.config.registers().to_vec(),
            bar_addr: self.bar_addr,
            msix: lock(&self.interrupt.msix).state(),
            common: CommonConfigState {
                status: c.status,
                generation: c.generation,
                device_feature_select: c.device_feature_select,
                driver_feature_select: c.driver_feature_select,
                driver_features: c.driver_features,
                queue_select: c.queue_select,
                config_vector: c.config_vector,
            },
            queues: self
                .queues
                .iter()
                .map(|s| QueueSlotState {
                    size: s.queue.size(),
                    ready: s.queue.ready(),
                    desc_table: s.queue.desc_table(),
                    avail_ring: s.queue.avail_ring(),
                    used_ring: s.queue.used_ring(),
                    vector: s.vector,
                })
                .collect(),
            progress,
            isr: self.interrupt.isr.load(Ordering::Acquire),
            needs_reset: self.interrupt.needs_reset.load(Ordering::Acquire),
            active: self.active,
            device_config: self.device_config(),
            backend_state,
        })
    }

    fn device_config(&self) -> Vec<u8> {
        let mut config = vec![0u8; DEVICE_CONFIG_BYTES];
        lock(&self.device).read_config(0, &mut config);
        config
    }

    /// Restores `s` into this function, freshly created over a new backend
    /// and attached with its BARs where they were saved. Everything is
    /// checked before anything is changed that the guest could see; an
    /// active device is then activated with its queues where the saved
    /// worker left them, told it is being restored, and every queue is
    /// looked at once (notifications the old process had not handled are
    /// gone).
    pub fn restore_state(&mut self, s: &VirtioPciState) -> Result<(), StateError> {
        let mismatch = |m: String| Err(StateError::Mismatch(m));
        if self.active {
            return mismatch("the device is active already".into());
        }
        if s.queues.len() != self.queues.len() {
            return mismatch(format!(
                "{} queues saved, the device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        let now = self.device_config();
        if !lock(&self.device).config_restorable(&s.device_config, &now) {
            return mismatch(
                "the device configuration differs from the snapshot's (another disk size, MAC or CID?)"
                    .into(),
            );
        }
        if s.bar_addr != self.bar_addr {
            return mismatch(format!(
                "BAR0 saved at {:#x}, placed at {:#x}",
                s.bar_addr, self.bar_addr
            ));
        }
        if s.active && s.common.driver_features & !self.offered_features != 0 {
            return mismatch(format!(
                "the driver's features {:#x} are not all offered ({:#x})",
                s.common.driver_features, self.offered_features
            ));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (index, (slot, q)) in self.queues.iter().zip(&s.queues).enumerate() {
            let state = QueueState {
                max_size: slot.queue.max_size(),
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
                ..QueueState::default()
            };
            let queue = Queue::try_from(state).map_err(|e| StateError::BadQueue {
                index,
                reason: e.to_string(),
            })?;
            queues.push(QueueSlot {
                queue,
                vector: q.vector,
            });
        }
        if let Some(p) = s
            .progress
            .iter()
            .find(|p| !queues.get(p.index).is_some_and(|q| q.queue.ready()))
        {
            return Err(StateError::BadQueue {
                index: p.index,
                reason: "progress saved for a queue that is not ready".into(),
            });
        }
        self.config
            .restore_registers(&s.config)
            .map_err(|e| StateError::Mismatch(e.to_string()))?;
        lock(&self.interrupt.msix).restore(&s.msix)?;
        let mut common = CommonConfig::new(self.log.clone());
        common.status = s.common.status;
        common.generation = s.common.generation;
        common.device_feature_select = s.common.device_feature_select;
        common.driver_feature_select = s.common.driver_feature_select;
        common.driver_features = s.common.driver_features;
        common.queue_select = s.common.queue_select;
        common.config_vector = s.common.config_vector;
        self.common = common;
        self.queues = queues;
        self.interrupt.isr.store(s.isr, Ordering::Release);
        self.interrupt
            .needs_reset
            .store(s.needs_reset, Ordering::Release);
        self.sync_vectors();
        if s.active {
            let mut dev = lock(&self.device);
            dev.ack_features(s.common.driver_features);
            let restoring = dev.restoring(s.backend_state.as_deref());
            drop(dev);
            restoring?;
            self.activate_with(&s.progress);
            if !self.active {
                return Err(StateError::Activate);
            }
            for e in &self.queue_evts {
                let _ = e.write(1);
            }
        }
        Ok(())
    }
}
