//! A writer for the `newc` cpio format the Linux kernel unpacks as an
//! initramfs. Output is deterministic: callers give entries in order, and
//! inode numbers, timestamps and owners are fixed.

use std::io::{self, Write};

/// File type bits of `mode`.
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;

/// One archive member's header fields.
#[derive(Debug, Clone)]
pub struct Header<'a> {
    pub name: &'a str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    pub size: u32,
}

/// Streams `newc` entries to `W`.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self { out, written: 0, next_ino: 1 }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }

    /// Writes one entry: the header, then `data` (which must be
    /// `header.size` bytes long).
    pub fn entry(&mut self, h: &Header<'_>, data: &[u8]) -> io::Result<()> {
        if data.len() != h.size as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "cpio entry size mismatch"));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if h.mode & S_IFDIR == S_IFDIR && h.mode & S_IFREG == 0 { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            ino,
            h.mode,
            h.uid,
            h.gid,
            nlink,
            0, // mtime: fixed for reproducible archives
            h.size,
            0,
            0,
            h.rdev_major,
            h.rdev_minor,
            h.name.len() + 1,
            0,
        );
        self.put(header.as_bytes())?;
        self.put(h.name.as_bytes())?;
        self.put(&[0])?;
        self.pad4()?;
        self.put(data)?;
        self.pad4()
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        let h = Header { name: "TRAILER!!!", mode: 0, uid: 0, gid: 0, rdev_major: 0, rdev_minor: 0, size: 0 };
        self.entry(&h, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_terminated() {
        let mut w = CpioWriter::new(Vec::new());
        let h = Header { name: "init", mode: S_IFREG | 0o755, uid: 0, gid: 0, rdev_major: 0, rdev_minor: 0, size: 3 };
        w.entry(&h, b"abc").unwrap();
        let out = w.finish().unwrap();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        // 110-byte header + "init\0" padded to 116, data padded to 120.
        assert_eq!(&out[110..114], b"init");
        assert_eq!(&out[116..119], b"abc");
        assert_eq!(&out[120..126], b"070701");
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn size_mismatch_is_an_error() {
        let mut w = CpioWriter::new(Vec::new());
        let h = Header { name: "x", mode: S_IFREG, uid: 0, gid: 0, rdev_major: 0, rdev_minor: 0, size: 5 };
        assert!(w.entry(&h, b"abc").is_err());
    }
}
