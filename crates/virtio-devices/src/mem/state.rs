//! The virtio-mem state machine (VIRTIO 1.2 §5.15): the region's geometry,
//! a bitmap of plugged blocks, the size the host requests, and the four
//! requests a driver can send. Pure logic over byte buffers, so that it can
//! be tested and fuzzed without a queue.

use std::io;
use std::sync::Arc;

/// `VIRTIO_MEM_REQ_PLUG`: plug `nb_blocks` blocks at `addr`.
pub const REQ_PLUG: u16 = 0;
/// `VIRTIO_MEM_REQ_UNPLUG`: unplug `nb_blocks` blocks at `addr`.
pub const REQ_UNPLUG: u16 = 1;
/// `VIRTIO_MEM_REQ_UNPLUG_ALL`: unplug every block.
pub const REQ_UNPLUG_ALL: u16 = 2;
/// `VIRTIO_MEM_REQ_STATE`: are the blocks at `addr` plugged?
pub const REQ_STATE: u16 = 3;

/// The request was executed.
pub const RESP_ACK: u16 = 0;
/// The request was refused (plugging beyond the requested size).
pub const RESP_NACK: u16 = 1;
/// The device is busy; the driver may retry (unused: this device never is).
pub const RESP_BUSY: u16 = 2;
/// The request is invalid (misaligned, out of range, wrong block state) or
/// the host failed to carry it out.
pub const RESP_ERROR: u16 = 3;

/// `VIRTIO_MEM_STATE_PLUGGED`: every block of the range is plugged.
pub const STATE_PLUGGED: u16 = 0;
/// `VIRTIO_MEM_STATE_UNPLUGGED`: no block of the range is plugged.
pub const STATE_UNPLUGGED: u16 = 1;
/// `VIRTIO_MEM_STATE_MIXED`: some are, some are not.
pub const STATE_MIXED: u16 = 2;

/// Size of `struct virtio_mem_req`: type, 3 × padding, addr, nb_blocks, 3 × padding.
pub const REQ_SIZE: usize = 24;
/// Bytes of a request that a ranged request (plug, unplug, state) needs:
/// up to and including `nb_blocks`.
pub const REQ_RANGE_SIZE: usize = 18;
/// Size of `struct virtio_mem_resp`: type, 3 × padding, state.
pub const RESP_SIZE: usize = 10;
/// Size of `struct virtio_mem_config`.
pub const CONFIG_SIZE: usize = 56;

/// Smallest block size offered: Linux wants at least a (huge) page.
pub const MIN_BLOCK_SIZE: u64 = 2 << 20;

/// Errors of the virtio-mem device's host-facing side.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// The region does not fit the device's rules.
    #[error(
        "virtio-mem region at {addr:#x}, {size:#x} bytes, block size {block_size:#x}: \
         block size must be a power of two of at least 2 MiB and address and size multiples of it"
    )]
    Geometry {
        /// Guest physical start.
        addr: u64,
        /// Size in bytes.
        size: u64,
        /// Block size in bytes.
        block_size: u64,
    },
    /// The requested size is not a multiple of the block size or larger
    /// than the region.
    #[error("requested size {requested:#x} must be a multiple of {block_size:#x} and at most {region_size:#x}")]
    RequestedSize {
        /// What was asked.
        requested: u64,
        /// Block size in bytes.
        block_size: u64,
        /// Size of the region.
        region_size: u64,
    },
}

/// Gives memory back to the host. The VMM implements it over what backs
/// the region (e.g. `fallocate(PUNCH_HOLE)` on a memfd); offsets are
/// relative to the start of the region and always within it.
pub trait MemoryBackend: Send + Sync {
    /// Frees `len` bytes at `offset_in_region`; they read as zeros after.
    fn discard(&self, offset_in_region: u64, len: u64) -> io::Result<()>;
}

/// Where the device's memory lies in guest physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemGeometry {
    /// Guest physical address of the region.
    pub addr: u64,
    /// Size of the region in bytes.
    pub region_size: u64,
    /// Plug granularity in bytes.
    pub block_size: u64,
}

impl MemGeometry {
    fn check(&self) -> Result<u64, MemError> {
        let bad = || MemError::Geometry {
            addr: self.addr,
            size: self.region_size,
            block_size: self.block_size,
        };
        let b = self.block_size;
        if b < MIN_BLOCK_SIZE
            || !b.is_power_of_two()
            || !self.addr.is_multiple_of(b)
            || !self.region_size.is_multiple_of(b)
        {
            return Err(bad());
        }
        if self.region_size == 0 || self.addr.checked_add(self.region_size).is_none() {
            return Err(bad());
        }
        Ok(self.region_size / b)
    }
}

/// What a request got: the response type and, for `STATE`, the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// `RESP_*`.
    pub kind: u16,
    /// `STATE_*` for an acknowledged `STATE` request, else 0.
    pub state: u16,
}

impl Response {
    fn of(kind: u16) -> Self {
        Response { kind, state: 0 }
    }

    /// The response as the driver reads it (`struct virtio_mem_resp`).
    pub fn to_bytes(self) -> [u8; RESP_SIZE] {
        let mut b = [0u8; RESP_SIZE];
        b[0..2].copy_from_slice(&self.kind.to_le_bytes());
        b[8..10].copy_from_slice(&self.state.to_le_bytes());
        b
    }
}

/// The device's memory state, shared by the device (config space, the
/// VMM's requested size) and its worker (requests).
pub struct MemState {
    geometry: MemGeometry,
    blocks: u64,
    /// One bit per block, set when plugged.
    bitmap: Vec<u64>,
    plugged_blocks: u64,
    requested_size: u64,
    backend: Arc<dyn MemoryBackend>,
}

impl MemState {
    /// Nothing plugged, nothing requested.
    pub fn new(geometry: MemGeometry, backend: Arc<dyn MemoryBackend>) -> Result<Self, MemError> {
        let blocks = geometry.check()?;
        let words = usize::try_from(blocks.div_ceil(64)).map_err(|_| MemError::Geometry {
            addr: geometry.addr,
            size: geometry.region_size,
            block_size: geometry.block_size,
        })?;
        Ok(MemState {
            geometry,
            blocks,
            bitmap: vec![0; words],
            plugged_blocks: 0,
            requested_size: 0,
            backend,
        })
    }

    /// The region.
    pub fn geometry(&self) -> MemGeometry {
        self.geometry
    }

    /// Bytes the guest has plugged.
    pub fn plugged_size(&self) -> u64 {
        self.plugged_blocks * self.geometry.block_size
    }

    /// Bytes the host asks the guest to have plugged.
    pub fn requested_size(&self) -> u64 {
        self.requested_size
    }

    /// Asks the guest to plug or unplug towards `bytes` (a multiple of the
    /// block size, at most the region). The caller then signals a
    /// configuration change.
    pub fn set_requested_size(&mut self, bytes: u64) -> Result<(), MemError> {
        let g = self.geometry;
        if !bytes.is_multiple_of(g.block_size) || bytes > g.region_size {
            return Err(MemError::RequestedSize {
                requested: bytes,
                block_size: g.block_size,
                region_size: g.region_size,
            });
        }
        self.requested_size = bytes;
        Ok(())
    }

    /// `struct virtio_mem_config`. The whole region is usable.
    pub fn config(&self) -> [u8; CONFIG_SIZE] {
        let g = self.geometry;
        let mut c = [0u8; CONFIG_SIZE];
        c[0..8].copy_from_slice(&g.block_size.to_le_bytes());
        // node_id (8..10) stays 0: VIRTIO_MEM_F_ACPI_PXM is not offered.
        c[16..24].copy_from_slice(&g.addr.to_le_bytes());
        c[24..32].copy_from_slice(&g.region_size.to_le_bytes());
        c[32..40].copy_from_slice(&g.region_size.to_le_bytes());
        c[40..48].copy_from_slice(&self.plugged_size().to_le_bytes());
        c[48..56].copy_from_slice(&self.requested_size.to_le_bytes());
        c
    }

    fn is_plugged(&self, block: u64) -> bool {
        self.bitmap[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn set(&mut self, first: u64, count: u64, plugged: bool) {
        for b in first..first + count {
            let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
            if plugged {
                self.bitmap[w] |= bit;
            } else {
                self.bitmap[w] &= !bit;
            }
        }
        if plugged {
            self.plugged_blocks += count;
        } else {
            self.plugged_blocks -= count;
        }
    }

    fn plugged_in(&self, first: u64, count: u64) -> u64 {
        (first..first + count)
            .filter(|b| self.is_plugged(*b))
            .count() as u64
    }

    /// The blocks `[first, first + count)` of a request's `addr` and
    /// `nb_blocks`, if they are aligned, non-empty and inside the region.
    fn range(&self, addr: u64, nb_blocks: u16) -> Option<(u64, u64)> {
        let g = self.geometry;
        let offset = addr.checked_sub(g.addr)?;
        if !offset.is_multiple_of(g.block_size) || nb_blocks == 0 {
            return None;
        }
        let (first, count) = (offset / g.block_size, u64::from(nb_blocks));
        (first.checked_add(count)? <= self.blocks).then_some((first, count))
    }

    /// Executes one request (`struct virtio_mem_req`, possibly short) and
    /// returns the response. Never fails the host: bad requests get
    /// `ERROR`, plugging beyond the requested size gets `NACK`.
    pub fn handle(&mut self, req: &[u8]) -> Response {
        let Some(kind) = req.get(0..2).map(|b| u16::from_le_bytes([b[0], b[1]])) else {
            return Response::of(RESP_ERROR);
        };
        if kind == REQ_UNPLUG_ALL {
            return self.unplug_all();
        }
        if req.len() < REQ_RANGE_SIZE {
            return Response::of(RESP_ERROR);
        }
        let addr = u64::from_le_bytes(req[8..16].try_into().unwrap_or_default());
        let nb_blocks = u16::from_le_bytes([req[16], req[17]]);
        let Some((first, count)) = self.range(addr, nb_blocks) else {
            return Response::of(RESP_ERROR);
        };
        match kind {
            REQ_PLUG => {
                if self.plugged_in(first, count) != 0 {
                    return Response::of(RESP_ERROR);
                }
                if self.plugged_blocks + count > self.requested_size / self.geometry.block_size {
                    return Response::of(RESP_NACK);
                }
                self.set(first, count, true);
                Response::of(RESP_ACK)
            }
            REQ_UNPLUG => {
                if self.plugged_in(first, count) != count {
                    return Response::of(RESP_ERROR);
                }
                let b = self.geometry.block_size;
                if let Err(e) = self.backend.discard(first * b, count * b) {
                    log::error!("virtio-mem: cannot give unplugged memory back to the host: {e}");
                    return Response::of(RESP_ERROR);
                }
                self.set(first, count, false);
                Response::of(RESP_ACK)
            }
            REQ_STATE => {
                let state = match self.plugged_in(first, count) {
                    0 => STATE_UNPLUGGED,
                    n if n == count => STATE_PLUGGED,
                    _ => STATE_MIXED,
                };
                Response {
                    kind: RESP_ACK,
                    state,
                }
            }
            _ => Response::of(RESP_ERROR),
        }
    }

    fn unplug_all(&mut self) -> Response {
        if let Err(e) = self.backend.discard(0, self.geometry.region_size) {
            log::error!("virtio-mem: cannot give unplugged memory back to the host: {e}");
            return Response::of(RESP_ERROR);
        }
        self.bitmap.fill(0);
        self.plugged_blocks = 0;
        Response::of(RESP_ACK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const BLOCK: u64 = 2 << 20;
    const BASE: u64 = 1 << 32;

    /// Records discards; fails them when asked.
    #[derive(Default)]
    struct Recorder {
        discards: Mutex<Vec<(u64, u64)>>,
        fail: std::sync::atomic::AtomicBool,
    }

    impl MemoryBackend for Recorder {
        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.discards.lock().unwrap().push((offset, len));
            Ok(())
        }
    }

    fn state(blocks: u64) -> (MemState, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let g = MemGeometry {
            addr: BASE,
            region_size: blocks * BLOCK,
            block_size: BLOCK,
        };
        (MemState::new(g, rec.clone()).unwrap(), rec)
    }

    fn req(kind: u16, addr: u64, nb: u16) -> [u8; REQ_SIZE] {
        let mut r = [0u8; REQ_SIZE];
        r[0..2].copy_from_slice(&kind.to_le_bytes());
        r[8..16].copy_from_slice(&addr.to_le_bytes());
        r[16..18].copy_from_slice(&nb.to_le_bytes());
        r
    }

    fn kind(s: &mut MemState, k: u16, addr: u64, nb: u16) -> u16 {
        s.handle(&req(k, addr, nb)).kind
    }

    #[test]
    fn geometry_is_checked() {
        let rec: Arc<dyn MemoryBackend> = Arc::new(Recorder::default());
        let bad = [
            MemGeometry {
                addr: BASE,
                region_size: 0,
                block_size: BLOCK,
            },
            MemGeometry {
                addr: BASE + 4096,
                region_size: BLOCK,
                block_size: BLOCK,
            },
            MemGeometry {
                addr: BASE,
                region_size: BLOCK + 1,
                block_size: BLOCK,
            },
            MemGeometry {
                addr: BASE,
                region_size: 3 << 20,
                block_size: 3 << 20,
            },
            MemGeometry {
                addr: BASE,
                region_size: 4096,
                block_size: 4096,
            },
            MemGeometry {
                addr: u64::MAX - BLOCK + 1,
                region_size: 2 * BLOCK,
                block_size: BLOCK,
            },
        ];
        for g in bad {
            assert!(MemState::new(g, rec.clone()).is_err(), "{g:?}");
        }
    }

    #[test]
    fn plug_up_to_the_requested_size_then_nack() {
        let (mut s, _) = state(8);
        assert_eq!(
            kind(&mut s, REQ_PLUG, BASE, 1),
            RESP_NACK,
            "nothing requested yet"
        );
        s.set_requested_size(3 * BLOCK).unwrap();
        assert_eq!(kind(&mut s, REQ_PLUG, BASE, 2), RESP_ACK);
        assert_eq!(
            kind(&mut s, REQ_PLUG, BASE + 4 * BLOCK, 2),
            RESP_NACK,
            "4 > 3 blocks"
        );
        assert_eq!(kind(&mut s, REQ_PLUG, BASE + 4 * BLOCK, 1), RESP_ACK);
        assert_eq!(s.plugged_size(), 3 * BLOCK);
        let c = s.config();
        assert_eq!(u64::from_le_bytes(c[40..48].try_into().unwrap()), 3 * BLOCK);
        assert_eq!(u64::from_le_bytes(c[48..56].try_into().unwrap()), 3 * BLOCK);
        assert_eq!(u64::from_le_bytes(c[16..24].try_into().unwrap()), BASE);
        assert_eq!(u64::from_le_bytes(c[32..40].try_into().unwrap()), 8 * BLOCK);
    }

    #[test]
    fn bad_ranges_are_errors_and_change_nothing() {
        let (mut s, rec) = state(8);
        s.set_requested_size(8 * BLOCK).unwrap();
        for (addr, nb) in [
            (BASE + 4096, 1),      // misaligned
            (BASE - BLOCK, 1),     // below the region
            (BASE + 8 * BLOCK, 1), // past the end
            (BASE + 7 * BLOCK, 2), // runs past the end
            (BASE, 0),             // empty
            (BASE, u16::MAX),      // far too many blocks
            (!(BLOCK - 1), 1),     // overflow
            (0, 1),
        ] {
            for k in [REQ_PLUG, REQ_UNPLUG, REQ_STATE] {
                assert_eq!(kind(&mut s, k, addr, nb), RESP_ERROR, "{k} {addr:#x} {nb}");
            }
        }
        assert_eq!(kind(&mut s, 7, BASE, 1), RESP_ERROR, "unknown request type");
        assert_eq!(s.handle(&[]).kind, RESP_ERROR, "empty request");
        assert_eq!(
            s.handle(&req(REQ_PLUG, BASE, 1)[..17]).kind,
            RESP_ERROR,
            "short request"
        );
        assert_eq!(s.plugged_size(), 0);
        assert!(rec.discards.lock().unwrap().is_empty());
    }

    #[test]
    fn double_plug_and_unplug_of_unplugged_are_errors() {
        let (mut s, rec) = state(8);
        s.set_requested_size(8 * BLOCK).unwrap();
        assert_eq!(kind(&mut s, REQ_PLUG, BASE + BLOCK, 2), RESP_ACK);
        assert_eq!(
            kind(&mut s, REQ_PLUG, BASE, 2),
            RESP_ERROR,
            "block 1 is plugged"
        );
        assert_eq!(
            kind(&mut s, REQ_UNPLUG, BASE, 2),
            RESP_ERROR,
            "block 0 is not"
        );
        assert_eq!(kind(&mut s, REQ_UNPLUG, BASE + 2 * BLOCK, 1), RESP_ACK);
        assert_eq!(*rec.discards.lock().unwrap(), vec![(2 * BLOCK, BLOCK)]);
        assert_eq!(
            kind(&mut s, REQ_UNPLUG, BASE + 2 * BLOCK, 1),
            RESP_ERROR,
            "already unplugged"
        );
        assert_eq!(s.plugged_size(), BLOCK);
    }

    #[test]
    fn state_reports_plugged_unplugged_mixed() {
        let (mut s, _) = state(130);
        s.set_requested_size(130 * BLOCK).unwrap();
        assert_eq!(kind(&mut s, REQ_PLUG, BASE + 63 * BLOCK, 3), RESP_ACK); // across a bitmap word
        let st = |s: &mut MemState, a, n| {
            let r = s.handle(&req(REQ_STATE, BASE + a * BLOCK, n));
            assert_eq!(r.kind, RESP_ACK);
            r.state
        };
        assert_eq!(st(&mut s, 63, 3), STATE_PLUGGED);
        assert_eq!(st(&mut s, 0, 63), STATE_UNPLUGGED);
        assert_eq!(st(&mut s, 60, 10), STATE_MIXED);
        assert_eq!(st(&mut s, 0, 130), STATE_MIXED);
        let bytes = Response {
            kind: RESP_ACK,
            state: STATE_MIXED,
        }
        .to_bytes();
        assert_eq!(bytes, [0, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
    }

    #[test]
    fn unplug_all_discards_the_region() {
        let (mut s, rec) = state(8);
        s.set_requested_size(4 * BLOCK).unwrap();
        assert_eq!(kind(&mut s, REQ_PLUG, BASE, 4), RESP_ACK);
        assert_eq!(
            s.handle(&REQ_UNPLUG_ALL.to_le_bytes()).kind,
            RESP_ACK,
            "short UNPLUG_ALL is fine"
        );
        assert_eq!(s.plugged_size(), 0);
        assert_eq!(*rec.discards.lock().unwrap(), vec![(0, 8 * BLOCK)]);
        assert_eq!(kind(&mut s, REQ_PLUG, BASE, 4), RESP_ACK, "can plug again");
    }

    #[test]
    fn failed_discard_keeps_blocks_plugged() {
        let (mut s, rec) = state(8);
        s.set_requested_size(4 * BLOCK).unwrap();
        assert_eq!(kind(&mut s, REQ_PLUG, BASE, 4), RESP_ACK);
        rec.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(kind(&mut s, REQ_UNPLUG, BASE, 1), RESP_ERROR);
        assert_eq!(kind(&mut s, REQ_UNPLUG_ALL, 0, 0), RESP_ERROR);
        assert_eq!(s.plugged_size(), 4 * BLOCK);
    }

    #[test]
    fn requested_size_is_checked() {
        let (mut s, _) = state(8);
        assert!(s.set_requested_size(BLOCK + 4096).is_err());
        assert!(s.set_requested_size(9 * BLOCK).is_err());
        s.set_requested_size(8 * BLOCK).unwrap();
        s.set_requested_size(0).unwrap();
        assert_eq!(s.requested_size(), 0);
    }
}
