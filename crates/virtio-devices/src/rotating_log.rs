//! A log file the guest writes (a console), kept under a size cap by
//! rotation, so a guest printing without end cannot fill the host's disk:
//! when a write would take the file past its cap, the file is renamed to
//! `PATH.1` (replacing the previous one) and a new `PATH` is started. At
//! most twice the cap is on disk; the newest output is always in `PATH`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The cap when none is given: 16 MiB per file.
pub const DEFAULT_LOG_CAP: u64 = 16 << 20;

/// An append-only, size-capped log file.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    file: File,
    size: u64,
    cap: u64,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl RotatingLog {
    /// Opens (appending) or creates `path`; rotates at `cap` bytes.
    pub fn open(path: &Path, cap: u64) -> io::Result<Self> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            path: path.to_path_buf(),
            file,
            size,
            cap: cap.max(1),
        })
    }

    /// The file the newest output goes to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn rotate(&mut self) -> io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

impl Write for RotatingLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.size > 0 && self.size.saturating_add(buf.len() as u64) > self.cap {
            self.rotate()?;
        }
        // A single write larger than the cap keeps only its tail.
        let keep = buf
            .len()
            .min(usize::try_from(self.cap).unwrap_or(usize::MAX));
        let tail = &buf[buf.len() - keep..];
        self.file.write_all(tail)?;
        self.size += tail.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_at_the_cap_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"old-").unwrap();
        let mut log = RotatingLog::open(&path, 10).unwrap();
        log.write_all(b"abcdef").unwrap(); // 10 bytes: at the cap, no rotation
        assert_eq!(std::fs::read(&path).unwrap(), b"old-abcdef");
        log.write_all(b"ghi").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"ghi");
        assert_eq!(
            std::fs::read(dir.path().join("console.log.1")).unwrap(),
            b"old-abcdef"
        );
        log.write_all(b"0123456789XYZ").unwrap(); // bigger than the cap
        assert_eq!(std::fs::read(&path).unwrap(), b"3456789XYZ");
        assert_eq!(
            std::fs::read(dir.path().join("console.log.1")).unwrap(),
            b"ghi"
        );
        for _ in 0..1000 {
            log.write_all(b"flood").unwrap();
        }
        let on_disk = std::fs::metadata(&path).unwrap().len()
            + std::fs::metadata(dir.path().join("console.log.1"))
                .unwrap()
                .len();
        assert!(on_disk <= 20, "{on_disk} bytes on disk with a 10-byte cap");
    }
}
