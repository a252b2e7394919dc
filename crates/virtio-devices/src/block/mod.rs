//! virtio-blk over a disk image (raw or qcow2, see the `disk-image` crate):
//! read, write, flush, GET_ID, read-only.
//!
//! One request queue served by a worker thread; requests run synchronously
//! on that thread with positioned I/O (`pread`/`pwrite` on the file, or
//! through the qcow2 layer), so the guest can keep at most one request in
//! flight per queue on the host.

pub mod request;

use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

pub use disk_image::{DiskError, Format};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use crate::device::{
    read_config_bytes, take_queue, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt,
};
use crate::lifecycle::{Lifecycle, WorkerDevice};
use crate::ratelimit::LogLimiter;
use crate::worker::{drain_eventfd, enum_tokens, EpollCtx, EpollHandler, WorkerError, WorkerQueue};
use crate::GuestMemoryMmap;
use request::{handle_request, BlockCounters, Disk, MAX_REQUEST_BYTES, SECTOR_SIZE};

const QUEUE_SIZE: u16 = 256;
/// Segments per request we announce (`seg_max`).
const SEG_MAX: u32 = 128;
/// Largest segment we announce (`size_max`).
const SIZE_MAX: u32 = 256 * 1024;

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened (missing, locked, or not a valid
    /// image of its format); the error names the file.
    #[error(transparent)]
    Image(#[from] DiskError),
}

/// How to open a disk.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// Image path.
    pub path: PathBuf,
    /// Image format; `None`: raw, unless the file starts with the qcow2
    /// magic, which is then refused (see `disk_image`'s format rule).
    pub format: Option<Format>,
    /// Refuse writes (`readonly=on`).
    pub readonly: bool,
    /// Serial reported by GET_ID (at most 20 bytes are used).
    pub serial: Option<String>,
}

/// The virtio-blk device.
pub struct Block {
    disk: Arc<Disk>,
    log: Arc<LogLimiter>,
    config: [u8; 24],
    acked_features: u64,
    life: Lifecycle<BlockHandler>,
    counters: Arc<BlockCounters>,
}

/// Opens and closes the image: every check [`Block::new`] makes, without a
/// device (so a bad image is reported before a VM exists).
pub fn check_image(cfg: &BlockConfig) -> Result<(), BlockError> {
    disk_image::open(&cfg.path, cfg.format, cfg.readonly)?;
    Ok(())
}

impl Block {
    /// Opens the image (locked: shared when read-only, exclusive otherwise).
    pub fn new(cfg: &BlockConfig) -> Result<Self, BlockError> {
        let image = disk_image::open(&cfg.path, cfg.format, cfg.readonly)?;
        let len = image.size();
        if len % SECTOR_SIZE != 0 {
            log::warn!(
                "disk {}: size {len} is not a multiple of {SECTOR_SIZE}; the tail is not visible",
                cfg.path.display()
            );
        }
        let sectors = len / SECTOR_SIZE;
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Ok(Block {
            disk: Arc::new(Disk {
                image,
                size: sectors * SECTOR_SIZE,
                readonly: cfg.readonly,
                serial: cfg.serial.as_ref().map(|s| s.as_bytes().to_vec()),
            }),
            log: Arc::new(LogLimiter::new(format!(
                "virtio-blk {}",
                cfg.path.display()
            ))),
            config,
            acked_features: 0,
            life: Lifecycle::new("virtio-blk"),
            counters: Arc::default(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.disk.size / SECTOR_SIZE
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | crate::device::RING_FEATURES;
        if self.disk.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }
    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    crate::lifecycle::lifecycle_methods!(snapshot);
    fn reset(&mut self) -> bool {
        self.reset_worker();
        self.acked_features = 0;
        true
    }
}

impl WorkerDevice for Block {
    type Handler = BlockHandler;
    fn lifecycle(&mut self) -> &mut Lifecycle<BlockHandler> {
        &mut self.life
    }
    fn handler(
        &self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut queues: Vec<ActiveQueue>,
    ) -> Result<BlockHandler, ActivateError> {
        Ok(BlockHandler {
            mem,
            interrupt,
            queue: take_queue(&mut queues, 0)?.into(),
            disk: self.disk.clone(),
            log: self.log.clone(),
            counters: self.counters.clone(),
        })
    }
}

/// Events of the block worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// The driver queued requests.
    Queue,
}
enum_tokens!(Token: Queue);

/// The block worker's handler.
pub struct BlockHandler {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    queue: WorkerQueue,
    disk: Arc<Disk>,
    log: Arc<LogLimiter>,
    counters: Arc<BlockCounters>,
}

impl crate::lifecycle::QueueOwner for BlockHandler {
    fn queue_progress(&self) -> Vec<crate::state::QueueProgress> {
        vec![crate::state::QueueProgress::of(
            self.queue.index,
            &self.queue.queue,
        )]
    }
}

impl EpollHandler for BlockHandler {
    type Token = Token;

    fn register(&mut self, ctx: &EpollCtx<Token>) -> std::io::Result<()> {
        ctx.add(self.queue.event.as_raw_fd(), Token::Queue, EventSet::IN)
    }

    fn handle_event(
        &mut self,
        ctx: &EpollCtx<Token>,
        token: Token,
        _events: EventSet,
    ) -> Result<(), WorkerError> {
        match token {
            Token::Queue => {
                drain_eventfd(&self.queue.event);
                self.counters.notifications.inc();
                let mem = self.mem.memory();
                let (disk, log, counters) = (&self.disk, &*self.log, &*self.counters);
                let irq = self.interrupt.as_ref();
                self.queue.serve(ctx, "virtio-blk", irq, |q| {
                    q.process(&mem, irq, |chain| {
                        handle_request(&mem, chain, disk, log, counters)
                    })
                    .map(drop)
                })?;
            }
        }
        Ok(())
    }
}

// The largest request the driver may build must be one we accept.
const _: () = assert!(MAX_REQUEST_BYTES as u64 >= SEG_MAX as u64 * SIZE_MAX as u64);

#[cfg(test)]
mod tests {
    use super::request::*;
    use super::*;
    use crate::test_utils::*;
    use std::fs::File;
    use std::io::{Read, Seek, SeekFrom, Write};
    use vmm_sys_util::eventfd::EventFd;

    struct Fixture {
        _dir: tempfile::TempDir,
        path: PathBuf,
        mem: GuestMemoryMmap,
        tq: TestQueue,
        kick: EventFd,
        blk: Block,
    }

    fn fixture(readonly: bool) -> Fixture {
        fixture_sized(readonly, 8192)
    }

    fn fixture_sized(readonly: bool, size: u32) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let mut f = File::create(&path).unwrap();
        let pattern: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        f.write_all(&pattern).unwrap();
        drop(f);
        attach(dir, path, None, readonly)
    }

    fn attach(
        dir: tempfile::TempDir,
        path: PathBuf,
        format: Option<Format>,
        readonly: bool,
    ) -> Fixture {
        let mem = single_region_mem(0x100_0000);
        let tq = TestQueue::new(&mem, 0, 16, 0x1_0000);
        let aq = tq.active(0);
        let kick = aq.event.try_clone().unwrap();
        let mut blk = Block::new(&BlockConfig {
            path: path.clone(),
            format,
            readonly,
            serial: Some("skiff-disk-0".into()),
        })
        .unwrap();
        blk.activate(atomic_mem(&mem), recorder(), vec![aq])
            .unwrap();
        Fixture {
            _dir: dir,
            path,
            mem,
            tq,
            kick,
            blk,
        }
    }

    fn header(t: u32, sector: u64) -> Vec<u8> {
        let mut h = t.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    /// Submits a request and waits for it; returns (used len, status, data addr).
    fn submit(fx: &mut Fixture, t: u32, sector: u64, data: Option<(Dir, u32)>) -> (u32, u8, u64) {
        submit_with(fx, t, sector, data, &[])
    }

    fn submit_with(
        fx: &mut Fixture,
        t: u32,
        sector: u64,
        data: Option<(Dir, u32)>,
        payload: &[u8],
    ) -> (u32, u8, u64) {
        let mut descs = vec![(Readable, 16)];
        descs.extend(data);
        descs.push((Writable, 1));
        let (_, addrs) = fx.tq.add_chain(&descs);
        fx.tq.write(addrs[0], &header(t, sector));
        if !payload.is_empty() {
            fx.tq.write(addrs[1], payload);
        }
        let n = fx.tq.used_idx();
        fx.kick.write(1).unwrap();
        assert!(wait_until(|| fx.tq.used_idx() == n + 1));
        let status = fx.tq.read(*addrs.last().unwrap(), 1)[0];
        (
            fx.tq.used_entry(n).1,
            status,
            addrs.get(1).copied().unwrap_or(0),
        )
    }

    #[test]
    fn config_reports_capacity_and_features() {
        let fx = fixture(true);
        let mut cap = [0u8; 8];
        fx.blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 16);
        assert_ne!(fx.blk.features() & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(fx.blk.sectors(), 16);
    }

    #[test]
    fn read_write_flush_get_id() {
        let mut fx = fixture(false);
        let (len, status, addr) = submit(&mut fx, VIRTIO_BLK_T_IN, 1, Some((Writable, 512)));
        assert_eq!((len, status), (513, VIRTIO_BLK_S_OK));
        let expect: Vec<u8> = (512..1024u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(fx.tq.read(addr, 512), expect);

        let payload = vec![0xabu8; 1024];
        let (len, status, _) = submit_with(
            &mut fx,
            VIRTIO_BLK_T_OUT,
            2,
            Some((Readable, 1024)),
            &payload,
        );
        assert_eq!((len, status), (1, VIRTIO_BLK_S_OK));
        let (_, status, _) = submit(&mut fx, VIRTIO_BLK_T_FLUSH, 0, None);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        let mut f = File::open(&fx.path).unwrap();
        let mut on_disk = vec![0u8; 1536];
        f.seek(SeekFrom::Start(1024 - 512)).unwrap();
        f.read_exact(&mut on_disk).unwrap();
        assert_eq!(on_disk[..512], expect[..], "sector 1 untouched");
        assert_eq!(on_disk[512..], payload[..], "sectors 2-3 written");

        let (len, status, addr) = submit(&mut fx, VIRTIO_BLK_T_GET_ID, 0, Some((Writable, 20)));
        assert_eq!((len, status), (21, VIRTIO_BLK_S_OK));
        assert_eq!(&fx.tq.read(addr, 20)[..13], b"skiff-disk-0\0");
    }

    #[test]
    fn counters_follow_requests() {
        let mut fx = fixture(false);
        submit(&mut fx, VIRTIO_BLK_T_IN, 1, Some((Writable, 512)));
        submit(&mut fx, VIRTIO_BLK_T_OUT, 2, Some((Readable, 1024)));
        submit(&mut fx, VIRTIO_BLK_T_FLUSH, 0, None);
        submit(&mut fx, 77, 0, None);
        // Past the end: an error, no bytes moved.
        submit(&mut fx, VIRTIO_BLK_T_IN, 16, Some((Writable, 512)));
        assert!(wait_until(|| fx.blk.counters()["interrupts"] == 5));
        let c = fx.blk.counters();
        assert_eq!(c["notifications"], 5);
        assert_eq!(c["requests"], 5);
        assert_eq!(c["errors"], 2);
        assert_eq!(c["read_bytes"], 512);
        assert_eq!(c["write_bytes"], 1024);
        assert_eq!(c["flushes"], 1);
    }

    #[test]
    fn multi_megabyte_requests_span_bounce_chunks() {
        let mut fx = fixture_sized(false, 4 << 20);
        // A 2.5 MiB read over three descriptors.
        let (_, addrs) = fx.tq.add_chain(&[
            (Readable, 16),
            (Writable, 1 << 20),
            (Writable, 1 << 20),
            (Writable, 512 << 10),
            (Writable, 1),
        ]);
        fx.tq.write(addrs[0], &header(VIRTIO_BLK_T_IN, 8));
        fx.kick.write(1).unwrap();
        assert!(wait_until(|| fx.tq.used_idx() == 1));
        assert_eq!(fx.tq.used_entry(0).1, (5 << 19) + 1);
        let got: Vec<u8> = [
            (addrs[1], 1 << 20),
            (addrs[2], 1 << 20),
            (addrs[3], 512 << 10),
        ]
        .iter()
        .flat_map(|(a, l)| fx.tq.read(*a, *l))
        .collect();
        let expect: Vec<u8> = (4096..4096 + (5u32 << 19))
            .map(|i| (i % 251) as u8)
            .collect();
        assert!(got == expect, "2.5 MiB read matches the image");
        // A 1.5 MiB write, read back from the file.
        let payload: Vec<u8> = (0..3u32 << 19).map(|i| (i % 13) as u8).collect();
        let (len, status, _) = submit_with(
            &mut fx,
            VIRTIO_BLK_T_OUT,
            16,
            Some((Readable, 3 << 19)),
            &payload,
        );
        assert_eq!((len, status), (1, VIRTIO_BLK_S_OK));
        let mut on_disk = vec![0u8; 3 << 19];
        let f = File::open(&fx.path).unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut on_disk, 16 * 512).unwrap();
        assert!(on_disk == payload, "1.5 MiB write landed");
    }

    #[test]
    fn readonly_refuses_writes() {
        let mut fx = fixture(true);
        let (len, status, _) = submit(&mut fx, VIRTIO_BLK_T_OUT, 0, Some((Readable, 512)));
        assert_eq!((len, status), (1, VIRTIO_BLK_S_IOERR));
        let (_, status, _) = submit(&mut fx, VIRTIO_BLK_T_FLUSH, 0, None);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        let mut f = File::open(&fx.path).unwrap();
        let mut first = [0u8; 4];
        f.read_exact(&mut first).unwrap();
        assert_eq!(first, [0, 1, 2, 3]);
    }

    #[test]
    fn bad_requests_get_error_status() {
        let mut fx = fixture(false);
        // Past the end of the disk.
        let (_, status, _) = submit(&mut fx, VIRTIO_BLK_T_IN, 16, Some((Writable, 512)));
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        // Sector overflow.
        let (_, status, _) = submit(&mut fx, VIRTIO_BLK_T_IN, u64::MAX, Some((Writable, 512)));
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        // Unknown type.
        let (_, status, _) = submit(&mut fx, 77, 0, None);
        assert_eq!(status, VIRTIO_BLK_S_UNSUPP);
        // Short header.
        let (_, addrs) = fx.tq.add_chain(&[(Readable, 8), (Writable, 1)]);
        fx.kick.write(1).unwrap();
        assert!(wait_until(|| fx.tq.used_idx() == 4));
        assert_eq!(fx.tq.read(addrs[1], 1)[0], VIRTIO_BLK_S_IOERR);
        // No status byte at all, and a chain outside memory: length 0.
        fx.tq.add_chain(&[(Readable, 16)]);
        fx.tq
            .add_raw_chain(&[(0x4000_0000, 16, Readable), (0x4000_0010, 1, Writable)]);
        fx.kick.write(1).unwrap();
        assert!(wait_until(|| fx.tq.used_idx() == 6));
        assert_eq!(fx.tq.used_entry(4).1, 0);
        assert_eq!(fx.tq.used_entry(5).1, 0);
        // The device still works afterwards.
        let (_, status, _) = submit(&mut fx, VIRTIO_BLK_T_IN, 0, Some((Writable, 512)));
        assert_eq!(status, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn indirect_read() {
        let mut fx = fixture(false);
        let (_, addrs) = fx.tq.add_indirect_chain(&[
            (Readable, 16),
            (Writable, 256),
            (Writable, 256),
            (Writable, 1),
        ]);
        fx.tq.write(addrs[0], &header(VIRTIO_BLK_T_IN, 0));
        fx.kick.write(1).unwrap();
        assert!(wait_until(|| fx.tq.used_idx() == 1));
        assert_eq!(fx.tq.used_entry(0).1, 513);
        assert_eq!(fx.tq.read(addrs[1], 4), vec![0, 1, 2, 3]);
        assert_eq!(fx.tq.read(addrs[2], 4), vec![5, 6, 7, 8]);
        assert_eq!(fx.tq.read(addrs[3], 1)[0], VIRTIO_BLK_S_OK);
        let _ = &fx.mem;
    }

    fn qemu(cmd: &str, args: &[&str]) {
        let out = std::process::Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{cmd} (install qemu-utils): {e}"));
        assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
    }

    /// A qcow2 overlay over a raw base through the whole device: reads come
    /// from the base, writes land in the overlay, a flush makes them visible
    /// to qemu-io, and qemu-img check finds the image clean.
    #[test]
    fn qcow2_overlay_through_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&base, &pattern).unwrap();
        let path = dir.path().join("overlay.qcow2");
        let p = |p: &PathBuf| p.to_str().unwrap().to_string();
        qemu(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                &p(&base),
                "-F",
                "raw",
                &p(&path),
            ],
        );
        // Unnamed format on a qcow2 file: refused, not probed.
        let err = Block::new(&BlockConfig {
            path: path.clone(),
            format: None,
            readonly: true,
            serial: None,
        })
        .err()
        .unwrap();
        assert!(matches!(err, BlockError::Image(DiskError::Ambiguous(_))));
        let mut fx = attach(dir, path.clone(), Some(Format::Qcow2), false);
        assert_eq!(fx.blk.sectors(), 2048);
        let (_, status, addr) = submit(&mut fx, VIRTIO_BLK_T_IN, 3, Some((Writable, 512)));
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert_eq!(fx.tq.read(addr, 512), pattern[1536..2048]);
        let payload = vec![0x5au8; 1024];
        let (_, status, _) = submit_with(
            &mut fx,
            VIRTIO_BLK_T_OUT,
            9,
            Some((Readable, 1024)),
            &payload,
        );
        assert_eq!(status, VIRTIO_BLK_S_OK);
        let (_, status, _) = submit(&mut fx, VIRTIO_BLK_T_FLUSH, 0, None);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        let (_, status, addr) = submit(&mut fx, VIRTIO_BLK_T_IN, 8, Some((Writable, 2048)));
        assert_eq!(status, VIRTIO_BLK_S_OK);
        let got = fx.tq.read(addr, 2048);
        assert_eq!(got[..512], pattern[4096..4608]);
        assert_eq!(got[512..1536], payload[..]);
        assert_eq!(got[1536..], pattern[5632..6144]);
        // Past the end of the virtual disk: an error.
        let (_, status, _) = submit(&mut fx, VIRTIO_BLK_T_IN, 2048, Some((Writable, 512)));
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        // Flushed: another reader of the file sees the write (the image is
        // locked exclusively, so qemu-io must not lock it).
        qemu(
            "qemu-io",
            &[
                "-r",
                "-U",
                "-f",
                "qcow2",
                "-c",
                "read -P 0x5a 4608 1024",
                &p(&path),
            ],
        );
        assert!(std::fs::read(&base).unwrap() == pattern, "base untouched");
        // Closing the device (its worker ends) leaves a clean image.
        let Fixture { _dir, blk, .. } = fx;
        drop(blk);
        qemu("qemu-img", &["check", "-q", &p(&path)]);
    }
}
