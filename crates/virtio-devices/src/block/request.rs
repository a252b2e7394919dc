//! Parsing and executing one virtio-blk request (virtio 1.x, 5.2.6).
//!
//! A request is a chain: a 16-byte readable header (type, reserved,
//! sector), data buffers (readable for writes, writable for reads) and a
//! final writable status byte. Everything about it is guest-controlled, so
//! every length and offset is checked and data moves in bounded chunks.

use std::io::{Read, Write};

use disk_image::{DiskError, DiskImage};

use virtio_queue::{DescriptorChain, Reader, Writer};

use crate::GuestMemoryMmap;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes moved between the file and guest memory at a time (the size of
/// each worker's bounce buffer).
const CHUNK: usize = 1 << 20;
/// Largest request we accept (the driver is told via `seg_max` and
/// `size_max`; anything larger is an I/O error, not an allocation).
pub const MAX_REQUEST_BYTES: usize = 32 << 20;
/// Length of a GET_ID answer.
pub const ID_BYTES: usize = 20;

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device id (serial).
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Errors of one request (logged, then reported to the guest as a status).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain is not a valid request (missing header or status).
    #[error("malformed request chain")]
    Malformed,
    /// The chain points outside guest memory.
    #[error("descriptor chain")]
    Chain(#[source] virtio_queue::Error),
    /// Copying to or from guest memory failed.
    #[error("guest memory access")]
    GuestMemory(#[source] std::io::Error),
    /// The request runs past the end of the disk or is too large.
    #[error("request of {len} bytes at sector {sector} is out of range")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Data length.
        len: usize,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// The disk image failed.
    #[error("disk I/O")]
    Io(#[source] DiskError),
    /// An unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

crate::lifecycle::device_counters! {
    /// What the block device did.
    pub struct BlockCounters {
        /// Queue notifications handled.
        notifications,
        /// Requests completed (any type, failed ones included).
        requests,
        /// Requests completed with an error or unsupported status.
        errors,
        /// Bytes read from the disk into guest buffers.
        read_bytes,
        /// Bytes written from guest buffers to the disk.
        write_bytes,
        /// Flush requests.
        flushes,
    }
}

/// The disk a worker serves.
pub struct Disk {
    /// The image.
    pub image: Box<dyn DiskImage>,
    /// Size in bytes (a multiple of the sector size).
    pub size: u64,
    /// Writes are refused.
    pub readonly: bool,
    /// GET_ID answer, up to 20 bytes.
    pub serial: Option<Vec<u8>>,
}

/// Executes the request in `chain`; returns the used length (bytes written
/// into the chain, including the status byte, or 0 if there was no status
/// byte to write).
pub fn handle_request(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    disk: &Disk,
    log: &crate::ratelimit::LogLimiter,
    counters: &BlockCounters,
) -> u32 {
    counters.requests.inc();
    let reader = Reader::new(mem, chain.clone());
    let writer = Writer::new(mem, chain);
    let (mut reader, mut writer) = match (reader, writer) {
        (Ok(r), Ok(w)) => (r, w),
        (Err(e), _) | (_, Err(e)) => {
            crate::guest_log!(
                log,
                log::Level::Warn,
                "virtio-blk: {}",
                RequestError::Chain(e)
            );
            return 0;
        }
    };
    if writer.available_bytes() == 0 {
        crate::guest_log!(
            log,
            log::Level::Warn,
            "virtio-blk: request without status byte"
        );
        return 0;
    }
    let data_len = writer.available_bytes() - 1;
    let mut status_writer = match writer.split_at(data_len) {
        Ok(s) => s,
        Err(e) => {
            crate::guest_log!(
                log,
                log::Level::Warn,
                "virtio-blk: {}",
                RequestError::Chain(e)
            );
            return 0;
        }
    };
    let status = match execute(&mut reader, &mut writer, disk, counters) {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(RequestError::Unsupported(t)) => {
            crate::guest_log!(
                log,
                log::Level::Debug,
                "virtio-blk: unsupported request type {t}"
            );
            VIRTIO_BLK_S_UNSUPP
        }
        Err(e) => {
            crate::guest_log!(log, log::Level::Warn, "virtio-blk: {e}");
            VIRTIO_BLK_S_IOERR
        }
    };
    if status != VIRTIO_BLK_S_OK {
        counters.errors.inc();
    }
    if status_writer.write_all(&[status]).is_err() {
        return 0;
    }
    (writer.bytes_written() + 1) as u32
}

fn execute(
    reader: &mut Reader<'_>,
    writer: &mut Writer<'_>,
    disk: &Disk,
    counters: &BlockCounters,
) -> Result<(), RequestError> {
    let mut header = [0u8; 16];
    reader
        .read_exact(&mut header)
        .map_err(|_| RequestError::Malformed)?;
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut s = [0u8; 8];
    s.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(s);
    match req_type {
        VIRTIO_BLK_T_IN => {
            let len = writer.available_bytes();
            let offset = check_range(disk, sector, len)?;
            read_disk(disk, offset, len, writer)?;
            counters.read_bytes.add(len as u64);
            Ok(())
        }
        VIRTIO_BLK_T_OUT => {
            if disk.readonly {
                return Err(RequestError::ReadOnly);
            }
            let len = reader.available_bytes();
            let offset = check_range(disk, sector, len)?;
            write_disk(disk, offset, len, reader)?;
            counters.write_bytes.add(len as u64);
            Ok(())
        }
        VIRTIO_BLK_T_FLUSH => {
            counters.flushes.inc();
            if disk.readonly {
                return Ok(());
            }
            disk.image.flush().map_err(RequestError::Io)
        }
        VIRTIO_BLK_T_GET_ID => {
            let serial = disk
                .serial
                .as_deref()
                .ok_or(RequestError::Unsupported(req_type))?;
            let mut id = [0u8; ID_BYTES];
            let n = serial.len().min(ID_BYTES);
            id[..n].copy_from_slice(&serial[..n]);
            let n = writer.available_bytes().min(ID_BYTES);
            writer
                .write_all(&id[..n])
                .map_err(RequestError::GuestMemory)
        }
        t => Err(RequestError::Unsupported(t)),
    }
}

fn check_range(disk: &Disk, sector: u64, len: usize) -> Result<u64, RequestError> {
    let err = || RequestError::OutOfRange { sector, len };
    if len > MAX_REQUEST_BYTES {
        return Err(err());
    }
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(err)?;
    let end = offset.checked_add(len as u64).ok_or_else(err)?;
    if end > disk.size {
        return Err(err());
    }
    Ok(offset)
}

fn read_disk(
    disk: &Disk,
    mut offset: u64,
    len: usize,
    writer: &mut Writer<'_>,
) -> Result<(), RequestError> {
    with_scratch(len.min(CHUNK), |buf| {
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            disk.image
                .read_at(&mut buf[..n], offset)
                .map_err(RequestError::Io)?;
            writer
                .write_all(&buf[..n])
                .map_err(RequestError::GuestMemory)?;
            offset += n as u64;
            left -= n;
        }
        Ok(())
    })
}

fn write_disk(
    disk: &Disk,
    mut offset: u64,
    len: usize,
    reader: &mut Reader<'_>,
) -> Result<(), RequestError> {
    with_scratch(len.min(CHUNK), |buf| {
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            reader
                .read_exact(&mut buf[..n])
                .map_err(RequestError::GuestMemory)?;
            disk.image
                .write_at(&buf[..n], offset)
                .map_err(RequestError::Io)?;
            offset += n as u64;
            left -= n;
        }
        Ok(())
    })
}

thread_local! {
    /// The worker thread's bounce buffer, allocated once.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with a bounce buffer of at least `len` (at most [`CHUNK`]) bytes.
fn with_scratch<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        f(&mut buf[..len])
    })
}
