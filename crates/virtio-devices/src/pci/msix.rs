//! MSI-X: the capability, the vector table and the pending bit array.
//!
//! Vectors are delivered through a [`vm_device::interrupt::InterruptGroup`].
//! A vector that fires while masked (its own mask bit, the function mask,
//! or MSI-X disabled) sets its pending bit instead, and is delivered when
//! it becomes unmasked. Every table change is pushed to the group with
//! [`InterruptGroup::update`] so the VMM can program its GSI routes.

use std::sync::Arc;

use crate::ratelimit::LogLimiter;

use vm_device::interrupt::{InterruptGroup, MsiMessage};

/// PCI capability id of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Maximum number of vectors a function may have.
pub const MAX_MSIX_VECTORS: u16 = 2048;
const MSG_CTL_ENABLE: u16 = 1 << 15;
const MSG_CTL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_CTL_MASK: u32 = 1;

/// Builds the 12-byte MSI-X capability body (id, next, control, table and
/// PBA offset/BIR) and the mask of its guest-writable bits.
pub fn msix_capability(
    vectors: u16,
    bar: u8,
    table_offset: u32,
    pba_offset: u32,
) -> ([u8; 12], [u8; 12]) {
    let mut body = [0u8; 12];
    body[0] = MSIX_CAP_ID;
    body[2..4].copy_from_slice(&(vectors - 1).to_le_bytes());
    body[4..8].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
    body[8..12].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
    let mut writable = [0u8; 12];
    writable[3] = 0xc0; // enable + function mask
    (body, writable)
}

/// One table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctl: u32,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            ctl: VECTOR_CTL_MASK,
        }
    }
}

impl Entry {
    fn msg(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }
    fn masked(&self) -> bool {
        self.ctl & VECTOR_CTL_MASK != 0
    }
}

/// The MSI-X state of one function.
pub struct MsixConfig {
    table: Vec<Entry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    group: Arc<dyn InterruptGroup>,
    log: LogLimiter,
}

impl MsixConfig {
    /// `vectors` entries (1..=2048, and no more than the group has),
    /// all masked.
    pub fn new(vectors: u16, group: Arc<dyn InterruptGroup>) -> Self {
        let n = usize::from(vectors.clamp(1, MAX_MSIX_VECTORS)).min(group.len().max(1));
        MsixConfig {
            table: vec![Entry::default(); n],
            pba: vec![0; n.div_ceil(64)],
            enabled: false,
            function_masked: false,
            group,
            log: LogLimiter::new("msix"),
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether the table is empty (never: there is at least one vector).
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Size in bytes of the table.
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// Size in bytes of the PBA (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// The interrupt group behind the vectors.
    pub fn group(&self) -> &Arc<dyn InterruptGroup> {
        &self.group
    }

    fn effectively_masked(&self, index: usize) -> bool {
        !self.enabled || self.function_masked || self.table[index].masked()
    }

    /// The guest wrote the capability's message control word.
    pub fn set_message_control(&mut self, ctl: u16) {
        let enabled = ctl & MSG_CTL_ENABLE != 0;
        let masked = ctl & MSG_CTL_FUNCTION_MASK != 0;
        if enabled == self.enabled && masked == self.function_masked {
            return;
        }
        self.enabled = enabled;
        self.function_masked = masked;
        for index in 0..self.table.len() {
            self.push_update(index);
            self.deliver_if_pending(index);
        }
    }

    /// The message control bits this state implies (enable, function mask).
    pub fn message_control_bits(&self) -> u16 {
        (if self.enabled { MSG_CTL_ENABLE } else { 0 })
            | (if self.function_masked {
                MSG_CTL_FUNCTION_MASK
            } else {
                0
            })
    }

    fn push_update(&self, index: usize) {
        let e = self.table[index];
        if let Err(err) = self
            .group
            .update(index, e.msg(), self.effectively_masked(index))
        {
            crate::guest_log!(
                self.log,
                log::Level::Warn,
                "msix: cannot program vector {index}: {err}"
            );
        }
    }

    fn pending(&self, index: usize) -> bool {
        self.pba[index / 64] & (1 << (index % 64)) != 0
    }

    fn set_pending(&mut self, index: usize, pending: bool) {
        let bit = 1u64 << (index % 64);
        if pending {
            self.pba[index / 64] |= bit;
        } else {
            self.pba[index / 64] &= !bit;
        }
    }

    fn deliver_if_pending(&mut self, index: usize) {
        if self.pending(index) && !self.effectively_masked(index) {
            self.set_pending(index, false);
            if let Err(e) = self.group.trigger(index) {
                crate::guest_log!(self.log, log::Level::Warn, "msix: vector {index}: {e}");
            }
        }
    }

    /// Raises `vector`, or marks it pending while masked. Out-of-range
    /// vectors (including virtio's `NO_VECTOR`) are ignored.
    pub fn trigger(&mut self, vector: u16) {
        let index = usize::from(vector);
        if index >= self.table.len() {
            return;
        }
        if self.effectively_masked(index) {
            self.set_pending(index, true);
            return;
        }
        if let Err(e) = self.group.trigger(index) {
            crate::guest_log!(self.log, log::Level::Warn, "msix: vector {index}: {e}");
        }
    }

    /// A guest read of the table at `offset`; 4- and 8-byte accesses.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let index = (offset / MSIX_TABLE_ENTRY_SIZE) as usize;
        let field = offset % MSIX_TABLE_ENTRY_SIZE;
        let Some(e) = self.table.get(index) else {
            return;
        };
        let words = [e.addr_lo, e.addr_hi, e.data, e.ctl];
        match (data.len(), field) {
            (4, 0 | 4 | 8 | 12) => data.copy_from_slice(&words[field as usize / 4].to_le_bytes()),
            (8, 0 | 8) => {
                let w = field as usize / 4;
                let v = u64::from(words[w + 1]) << 32 | u64::from(words[w]);
                data.copy_from_slice(&v.to_le_bytes());
            }
            _ => crate::guest_log!(
                self.log,
                log::Level::Warn,
                "msix: bad table read at {offset:#x} len {}",
                data.len()
            ),
        }
    }

    /// A guest write to the table at `offset`; 4- and 8-byte accesses.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let index = (offset / MSIX_TABLE_ENTRY_SIZE) as usize;
        let field = offset % MSIX_TABLE_ENTRY_SIZE;
        if index >= self.table.len() {
            return;
        }
        let mut words = match (data.len(), field) {
            (4, 0 | 4 | 8 | 12) | (8, 0 | 8) => {
                let mut v = [0u8; 8];
                v[..data.len()].copy_from_slice(data);
                let v = u64::from_le_bytes(v);
                vec![
                    (field as usize / 4, v as u32),
                    (field as usize / 4 + 1, (v >> 32) as u32),
                ]
            }
            _ => {
                crate::guest_log!(
                    self.log,
                    log::Level::Warn,
                    "msix: bad table write at {offset:#x} len {}",
                    data.len()
                );
                return;
            }
        };
        words.truncate(data.len() / 4);
        let before = self.table[index];
        for (w, v) in words {
            let e = &mut self.table[index];
            match w {
                0 => e.addr_lo = v,
                1 => e.addr_hi = v,
                2 => e.data = v,
                _ => e.ctl = v & VECTOR_CTL_MASK,
            }
        }
        if self.table[index] != before {
            self.push_update(index);
            self.deliver_if_pending(index);
        }
    }

    /// The table, pending bits and control bits, for a snapshot.
    pub fn state(&self) -> crate::state::MsixState {
        crate::state::MsixState {
            table: self
                .table
                .iter()
                .map(|e| [e.addr_lo, e.addr_hi, e.data, e.ctl])
                .collect(),
            pba: self.pba.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Takes a snapshot's state (same number of vectors) and programs
    /// every vector through the interrupt group, as the guest left them.
    pub fn restore(&mut self, s: &crate::state::MsixState) -> Result<(), crate::state::StateError> {
        if s.table.len() != self.table.len() || s.pba.len() != self.pba.len() {
            return Err(crate::state::StateError::Mismatch(format!(
                "{} MSI-X vectors saved, the device has {}",
                s.table.len(),
                self.table.len()
            )));
        }
        for (e, w) in self.table.iter_mut().zip(&s.table) {
            *e = Entry {
                addr_lo: w[0],
                addr_hi: w[1],
                data: w[2],
                ctl: w[3] & VECTOR_CTL_MASK,
            };
        }
        self.pba.copy_from_slice(&s.pba);
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        for index in 0..self.table.len() {
            self.push_update(index);
        }
        Ok(())
    }

    /// A guest read of the PBA at `offset` (read-only for the guest).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let q = (offset / 8) as usize;
        let Some(&word) = self.pba.get(q) else {
            return;
        };
        let bytes = word.to_le_bytes();
        let start = (offset % 8) as usize;
        let n = data.len().min(8 - start);
        data[..n].copy_from_slice(&bytes[start..start + n]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_device::interrupt::{EventFd, InterruptError};

    /// Records triggers and updates.
    #[derive(Default)]
    pub struct TestGroup {
        pub fired: Mutex<Vec<usize>>,
        pub updates: Mutex<Vec<(usize, MsiMessage, bool)>>,
    }

    impl InterruptGroup for TestGroup {
        fn len(&self) -> usize {
            64
        }
        fn trigger(&self, index: usize) -> Result<(), InterruptError> {
            self.fired.lock().unwrap().push(index);
            Ok(())
        }
        fn notifier(&self, _index: usize) -> Option<&EventFd> {
            None
        }
        fn update(
            &self,
            index: usize,
            msg: MsiMessage,
            masked: bool,
        ) -> Result<(), InterruptError> {
            self.updates.lock().unwrap().push((index, msg, masked));
            Ok(())
        }
    }

    fn setup(vectors: u16) -> (MsixConfig, Arc<TestGroup>) {
        let g = Arc::new(TestGroup::default());
        (MsixConfig::new(vectors, g.clone()), g)
    }

    fn program(m: &mut MsixConfig, index: u64, addr: u64, data: u32) {
        m.write_table(index * 16, &addr.to_le_bytes());
        m.write_table(index * 16 + 8, &data.to_le_bytes());
        m.write_table(index * 16 + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn masked_until_enabled_then_pending_delivered() {
        let (mut m, g) = setup(4);
        program(&mut m, 1, 0xfee0_0000, 0x41);
        m.trigger(1);
        assert!(g.fired.lock().unwrap().is_empty());
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        m.set_message_control(MSG_CTL_ENABLE);
        assert_eq!(*g.fired.lock().unwrap(), vec![1]);
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        let last = *g
            .updates
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|u| u.0 == 1)
            .unwrap();
        assert_eq!(
            last.1,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            }
        );
        assert!(!last.2, "vector 1 is unmasked once MSI-X is enabled");
        m.trigger(1);
        assert_eq!(*g.fired.lock().unwrap(), vec![1, 1]);
    }

    #[test]
    fn function_and_vector_masks() {
        let (mut m, g) = setup(2);
        program(&mut m, 0, 0xfee0_0000, 0x30);
        m.set_message_control(MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK);
        m.trigger(0);
        assert!(g.fired.lock().unwrap().is_empty());
        m.set_message_control(MSG_CTL_ENABLE);
        assert_eq!(*g.fired.lock().unwrap(), vec![0]);
        // Vector mask.
        m.write_table(12, &1u32.to_le_bytes());
        m.trigger(0);
        assert_eq!(g.fired.lock().unwrap().len(), 1);
        m.write_table(12, &0u32.to_le_bytes());
        assert_eq!(g.fired.lock().unwrap().len(), 2);
    }

    #[test]
    fn table_reads_and_bad_accesses() {
        let (mut m, _g) = setup(2);
        program(&mut m, 1, 0x1_fee0_1000, 7);
        let mut d4 = [0u8; 4];
        m.read_table(16, &mut d4);
        assert_eq!(u32::from_le_bytes(d4), 0xfee0_1000);
        let mut d8 = [0u8; 8];
        m.read_table(16, &mut d8);
        assert_eq!(u64::from_le_bytes(d8), 0x1_fee0_1000);
        m.read_table(28, &mut d4);
        assert_eq!(u32::from_le_bytes(d4), 0);
        // Out of range and odd sizes are ignored.
        m.write_table(0x1000, &[1, 2, 3, 4]);
        m.write_table(1, &[1, 2]);
        m.read_table(0x1000, &mut d4);
        assert_eq!(d4, [0; 4]);
        m.trigger(100);
        m.trigger(0xffff);
        assert_eq!(m.len(), 2);
        assert_eq!(m.table_size(), 32);
        assert_eq!(m.pba_size(), 8);
    }
}
