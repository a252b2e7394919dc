//! A CFI parallel flash (Intel command set, as QEMU's `pflash_cfi01`) for
//! the firmware's variable store: the subset edk2's
//! `QemuFlashFvbServicesRuntimeDxe` uses — read array, read status, clear
//! status, byte program, block erase — on one file whose changes are
//! written through to it, so variables survive the VM. Changes are
//! collected while the guest programs (one exit per byte) and written
//! when it returns the flash to read-array mode, as OVMF does after each
//! write: one file write per variable update instead of one per byte.
//!
//! In read-array mode the array can be mapped into the guest read-only
//! (QEMU's "romd" mode, through a [`RomdMapper`] the VMM gives): reads
//! then never exit, which matters because firmware walks its variable
//! store a great deal. Any command unmaps it until the guest returns to
//! read-array mode.
//!
//! Guest input cannot make it panic or write outside the file: offsets
//! beyond the device are ignored (the bus only routes accesses inside it,
//! and every access is checked again), unknown commands return to read
//! array mode.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_device::BusDevice;

use super::host_mapping::HostMapping;

/// Erase block size of the emulated flash (OVMF's `BLOCK_SIZE`).
pub const FLASH_BLOCK_SIZE: u64 = 0x1000;

const CMD_READ_ARRAY: u8 = 0xff;
const CMD_READ_STATUS: u8 = 0x70;
const CMD_CLEAR_STATUS: u8 = 0x50;
const CMD_PROGRAM: u8 = 0x10;
const CMD_PROGRAM_ALT: u8 = 0x40;
const CMD_BLOCK_ERASE: u8 = 0x20;
const CMD_ERASE_CONFIRM: u8 = 0xd0;
const CMD_READ_ID: u8 = 0x90;
const CMD_QUERY: u8 = 0x98;

/// Status: the write state machine is ready.
const STATUS_READY: u8 = 0x80;
/// Status: an erase or program failed (a write to the file failed).
const STATUS_ERROR: u8 = 0x30;

/// Maps the flash array into the guest read-only and unmaps it (the VMM
/// implements it with a KVM memory slot).
pub trait RomdMapper: Send {
    /// Maps `len` bytes at host address `host`.
    fn map(&mut self, host: u64, len: u64) -> std::io::Result<()>;
    /// Unmaps them: guest reads exit again.
    fn unmap(&mut self) -> std::io::Result<()>;
}

/// Why the flash cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    #[error("cannot open the variable store {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the variable store {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the variable store {path} is {size} bytes; it must be a non-zero multiple of {FLASH_BLOCK_SIZE} bytes")]
    Size { path: PathBuf, size: u64 },
    #[error("cannot map the variable store into the guest")]
    Map(#[source] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    ReadArray,
    /// Reads return the status register.
    Status,
    /// The next write is the byte to program.
    Program,
    /// The next write must confirm an erase of the block.
    EraseSetup,
}

/// The flash device: its contents in memory, mirrored to `file`.
pub struct Pflash {
    data: HostMapping,
    file: File,
    path: PathBuf,
    mode: Mode,
    status: u8,
    /// The range changed since the last write to the file.
    dirty: Option<(usize, usize)>,
    romd: Option<Box<dyn RomdMapper>>,
    /// Whether the array is mapped into the guest now.
    mapped: bool,
    log: virtio_devices::ratelimit::LogLimiter,
}

impl Pflash {
    /// Opens `path` read-write; its size is the flash's.
    pub fn open(path: &Path) -> Result<Self, FlashError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| FlashError::Open { path: path.to_path_buf(), source })?;
        let size = file.metadata().map_err(|source| FlashError::Read { path: path.to_path_buf(), source })?.len();
        // The caller checks the size against the space below 4 GiB; this
        // only refuses what cannot be a flash at all.
        if size == 0 || size % FLASH_BLOCK_SIZE != 0 || size > 64 << 20 {
            return Err(FlashError::Size { path: path.to_path_buf(), size });
        }
        let mut data = vec![0u8; size as usize];
        file.read_exact_at(&mut data, 0).map_err(|source| FlashError::Read { path: path.to_path_buf(), source })?;
        let data = HostMapping::from_bytes(&data).map_err(FlashError::Map)?;
        Ok(Self {
            data,
            file,
            path: path.to_path_buf(),
            mode: Mode::ReadArray,
            status: STATUS_READY,
            dirty: None,
            romd: None,
            mapped: false,
            log: virtio_devices::ratelimit::LogLimiter::new("pflash"),
        })
    }

    /// The flash's size in bytes.
    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }

    /// Maps the array into the guest with `romd` whenever it is in
    /// read-array mode (now, to begin with).
    pub fn set_romd(&mut self, romd: Box<dyn RomdMapper>) -> Result<(), FlashError> {
        let mut romd = romd;
        romd.map(self.data.host_addr(), self.size()).map_err(FlashError::Map)?;
        self.romd = Some(romd);
        self.mapped = true;
        Ok(())
    }

    /// Enters `mode`: the changes reach the file when the guest returns to
    /// read array, and the array is mapped only in that mode.
    fn set_mode(&mut self, mode: Mode) {
        if mode == Mode::ReadArray {
            self.flush();
        }
        self.mode = mode;
        let want = mode == Mode::ReadArray;
        let (host, len) = (self.data.host_addr(), self.size());
        let Some(romd) = self.romd.as_mut() else { return };
        if want == self.mapped {
            return;
        }
        match if want { romd.map(host, len) } else { romd.unmap() } {
            Ok(()) => self.mapped = want,
            // Unmapped, reads still work (they exit). A failed unmap would
            // let the guest read the array instead of the status.
            Err(e) => log::error!("pflash: cannot {} the flash array: {e}", if want { "map" } else { "unmap" }),
        }
    }

    /// Marks `len` bytes at `start` as changed.
    fn mark_dirty(&mut self, start: usize, len: usize) {
        let end = start + len;
        self.dirty = Some(self.dirty.map_or((start, end), |(s, e)| (s.min(start), e.max(end))));
    }

    /// Writes the changed range through to the file.
    fn flush(&mut self) {
        let Some((start, end)) = self.dirty.take() else { return };
        if let Err(e) = self.file.write_all_at(&self.data.as_slice()[start..end], start as u64) {
            self.status |= STATUS_ERROR;
            virtio_devices::guest_log!(
                &self.log,
                log::Level::Error,
                "pflash: cannot write the variable store {}: {e}",
                self.path.display()
            );
        }
    }

    fn program(&mut self, offset: usize, bytes: &[u8]) {
        let Some(end) = offset.checked_add(bytes.len()).filter(|e| *e <= self.data.len()) else {
            return;
        };
        self.data.as_mut_slice()[offset..end].copy_from_slice(bytes);
        self.mark_dirty(offset, bytes.len());
        self.status |= STATUS_READY;
    }

    fn erase(&mut self, offset: usize) {
        let block = FLASH_BLOCK_SIZE as usize;
        let start = offset - offset % block;
        if start + block > self.data.len() {
            return;
        }
        self.data.as_mut_slice()[start..start + block].fill(0xff);
        self.mark_dirty(start, block);
        self.status |= STATUS_READY;
    }
}

impl Drop for Pflash {
    fn drop(&mut self) {
        self.flush();
    }
}

impl BusDevice for Pflash {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match self.mode {
            Mode::ReadArray => {
                let start = offset as usize;
                match self.data.as_slice().get(start..start.saturating_add(data.len())) {
                    Some(src) => data.copy_from_slice(src),
                    None => data.fill(0xff),
                }
            }
            Mode::Status | Mode::Program | Mode::EraseSetup => data.fill(self.status),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&cmd) = data.first() else { return };
        let offset = offset as usize;
        if offset >= self.data.len() {
            return;
        }
        let next = match self.mode {
            Mode::Program => {
                // A program of the access's width (OVMF writes bytes).
                self.program(offset, data);
                Mode::Status
            }
            Mode::EraseSetup if cmd == CMD_ERASE_CONFIRM => {
                self.erase(offset);
                Mode::Status
            }
            // Anything else cancels the erase (as 0xff does).
            Mode::EraseSetup => Mode::ReadArray,
            Mode::ReadArray | Mode::Status => match cmd {
                CMD_READ_ARRAY => Mode::ReadArray,
                CMD_READ_STATUS => Mode::Status,
                CMD_CLEAR_STATUS => {
                    self.status = 0;
                    Mode::ReadArray
                }
                CMD_PROGRAM | CMD_PROGRAM_ALT => Mode::Program,
                CMD_BLOCK_ERASE => Mode::EraseSetup,
                // Identification is not offered: stay in read array.
                CMD_READ_ID | CMD_QUERY => Mode::ReadArray,
                _ => {
                    virtio_devices::guest_log!(
                        &self.log,
                        log::Level::Debug,
                        "pflash: unknown command {cmd:#x} at {offset:#x}"
                    );
                    Mode::ReadArray
                }
            },
        };
        self.set_mode(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flash(blocks: usize) -> (tempfile::NamedTempFile, Pflash) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), vec![0x5a; blocks * FLASH_BLOCK_SIZE as usize]).unwrap();
        let p = Pflash::open(f.path()).unwrap();
        (f, p)
    }

    fn rd(p: &mut Pflash, off: u64) -> u8 {
        let mut b = [0];
        p.read(0, off, &mut b);
        b[0]
    }

    #[test]
    fn ovmf_detection_sequence_sees_flash() {
        // QemuFlashDetected: write CLEAR_STATUS, read back (must not read
        // the command), then READ_STATUS must read 0 (cleared status).
        let (_f, mut p) = flash(2);
        let orig = rd(&mut p, 0x10);
        p.write(0, 0x10, &[CMD_CLEAR_STATUS]);
        assert_eq!(rd(&mut p, 0x10), orig);
        p.write(0, 0x10, &[CMD_READ_STATUS]);
        assert_eq!(rd(&mut p, 0x10), 0);
        p.write(0, 0x10, &[CMD_READ_ARRAY]);
        assert_eq!(rd(&mut p, 0x10), 0x5a);
    }

    #[test]
    fn program_and_erase_reach_the_file() {
        let (f, mut p) = flash(2);
        p.write(0, 0x1000, &[CMD_BLOCK_ERASE]);
        p.write(0, 0x1000, &[CMD_ERASE_CONFIRM]);
        assert_eq!(rd(&mut p, 0x1000), STATUS_READY);
        for (i, b) in b"var".iter().enumerate() {
            p.write(0, 0x1004 + i as u64, &[CMD_PROGRAM]);
            p.write(0, 0x1004 + i as u64, &[*b]);
        }
        assert_eq!(std::fs::read(f.path()).unwrap()[0x1004], 0x5a, "written before read-array mode");
        p.write(0, 0x1006, &[CMD_READ_ARRAY]);
        assert_eq!(rd(&mut p, 0x1000), 0xff);
        assert_eq!(rd(&mut p, 0x1005), b'a');
        let on_disk = std::fs::read(f.path()).unwrap();
        assert_eq!(&on_disk[0x1004..0x1007], b"var");
        assert_eq!(on_disk[0x1000], 0xff);
        assert_eq!(on_disk[0xfff], 0x5a);
    }

    /// Records the mapping calls.
    struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<bool>>>);

    impl RomdMapper for Recorder {
        fn map(&mut self, _host: u64, _len: u64) -> std::io::Result<()> {
            self.0.lock().unwrap().push(true);
            Ok(())
        }
        fn unmap(&mut self) -> std::io::Result<()> {
            self.0.lock().unwrap().push(false);
            Ok(())
        }
    }

    #[test]
    fn the_array_is_mapped_only_in_read_array_mode() {
        let (_f, mut p) = flash(2);
        let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        p.set_romd(Box::new(Recorder(calls.clone()))).unwrap();
        // A program sequence of two bytes: one unmap, one map at its end.
        for off in [0x10, 0x11] {
            p.write(0, off, &[CMD_PROGRAM]);
            p.write(0, off, &[0]);
        }
        p.write(0, 0x11, &[CMD_READ_ARRAY]);
        p.write(0, 0x11, &[CMD_READ_STATUS]);
        p.write(0, 0x11, &[CMD_CLEAR_STATUS]);
        assert_eq!(*calls.lock().unwrap(), [true, false, true, false, true]);
    }

    #[test]
    fn out_of_range_and_odd_accesses_are_ignored() {
        let (f, mut p) = flash(1);
        p.write(0, 0x5000, &[CMD_PROGRAM]);
        p.write(0, u64::MAX, &[CMD_BLOCK_ERASE]);
        p.write(0, 0xfff, &[CMD_PROGRAM]);
        p.write(0, 0xfff, &[1, 2, 3, 4]); // crosses the end: ignored
        p.write(0, 0, &[]);
        p.write(0, 0, &[CMD_READ_ARRAY]);
        let mut b = [0u8; 8];
        p.read(0, 0xffc, &mut b);
        assert_eq!(b, [0xff; 8]);
        p.read(0, u64::MAX, &mut b);
        assert_eq!(std::fs::read(f.path()).unwrap(), vec![0x5a; 0x1000]);
    }

    #[test]
    fn bad_files_are_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), vec![0; 100]).unwrap();
        assert!(matches!(Pflash::open(f.path()), Err(FlashError::Size { size: 100, .. })));
        assert!(matches!(Pflash::open(Path::new("/nonexistent/vars.fd")), Err(FlashError::Open { .. })));
    }
}
