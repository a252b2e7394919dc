//! Builds layer tarballs for tests, including hostile ones: names are
//! written into the header raw, so `..` and absolute paths go through.

#![allow(dead_code)]

use std::io::Write;

/// A tar layer under construction.
pub struct Layer {
    b: tar::Builder<Vec<u8>>,
    uid: u64,
    gid: u64,
    mtime: u64,
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    /// An empty layer; entries owned by 0:0 with mtime 1_600_000_000.
    pub fn new() -> Self {
        Self {
            b: tar::Builder::new(Vec::new()),
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
        }
    }

    /// Owner of the following entries.
    pub fn owner(&mut self, uid: u64, gid: u64) -> &mut Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// Mtime of the following entries.
    pub fn mtime(&mut self, t: u64) -> &mut Self {
        self.mtime = t;
        self
    }

    /// Appends an entry with a raw name, declared size and data.
    pub fn raw(
        &mut self,
        name: &str,
        kind: tar::EntryType,
        mode: u32,
        link: &str,
        size: u64,
        data: &[u8],
    ) -> &mut Self {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(self.uid);
        h.set_gid(self.gid);
        h.set_mtime(self.mtime);
        h.set_size(size);
        let old = h.as_old_mut();
        assert!(
            name.len() <= 100 && link.len() <= 100,
            "test names must fit the header"
        );
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname = [0; 100];
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        self.b.append(&h, data).expect("append to memory");
        self
    }

    /// A directory.
    pub fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.raw(name, tar::EntryType::Directory, mode, "", 0, &[])
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.raw(
            name,
            tar::EntryType::Regular,
            mode,
            "",
            data.len() as u64,
            data,
        )
    }

    /// A regular file with extended attributes (PAX `SCHILY.xattr.*`).
    pub fn file_xattrs(
        &mut self,
        name: &str,
        mode: u32,
        data: &[u8],
        xattrs: &[(&str, &[u8])],
    ) -> &mut Self {
        let keys: Vec<String> = xattrs
            .iter()
            .map(|(k, _)| format!("SCHILY.xattr.{k}"))
            .collect();
        let pax: Vec<(&str, &[u8])> = keys
            .iter()
            .zip(xattrs)
            .map(|(k, (_, v))| (k.as_str(), *v))
            .collect();
        self.b.append_pax_extensions(pax).expect("pax");
        self.file(name, mode, data)
    }

    /// A symlink.
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(name, tar::EntryType::Symlink, 0o777, target, 0, &[])
    }

    /// A hard link to an earlier entry.
    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(name, tar::EntryType::Link, 0o644, target, 0, &[])
    }

    /// A fifo.
    pub fn fifo(&mut self, name: &str, mode: u32) -> &mut Self {
        self.raw(name, tar::EntryType::Fifo, mode, "", 0, &[])
    }

    /// A character device.
    pub fn chardev(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> &mut Self {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Char);
        h.set_path(name).expect("device name");
        h.set_mode(mode);
        h.set_uid(self.uid);
        h.set_gid(self.gid);
        h.set_mtime(self.mtime);
        h.set_size(0);
        h.set_device_major(major).expect("major");
        h.set_device_minor(minor).expect("minor");
        h.set_cksum();
        self.b.append(&h, &[][..]).expect("append to memory");
        self
    }

    /// A block device.
    pub fn blockdev(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> &mut Self {
        self.chardev(name, mode, major, minor);
        // Re-type the header just appended (the last 512-byte block).
        let mut b = std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()))
            .into_inner()
            .expect("tar in memory");
        let at = b.len() - 512;
        let mut h = tar::Header::from_byte_slice(&b[at..]).clone();
        h.set_entry_type(tar::EntryType::Block);
        h.set_cksum();
        b[at..].copy_from_slice(h.as_bytes());
        self.b = tar::Builder::new(b);
        self
    }

    /// An extension header (GNU long name `L`, long link `K`, PAX `x`)
    /// declaring `size` bytes and carrying `data`, as hostile archives do.
    pub fn extension(&mut self, kind: tar::EntryType, size: u64, data: &[u8]) -> &mut Self {
        self.raw("././@LongLink", kind, 0o644, "", size, data)
    }

    /// A GNU sparse file of apparent size `size` whose only data is one
    /// byte `x` at its end.
    pub fn sparse(&mut self, name: &str, size: u64) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_path(name).expect("sparse name");
        h.set_mode(0o644);
        h.set_uid(self.uid);
        h.set_gid(self.gid);
        h.set_mtime(self.mtime);
        h.set_size(1);
        let gnu = h.as_gnu_mut().expect("gnu header");
        gnu.sparse[0].offset = octal12(size - 1);
        gnu.sparse[0].numbytes = octal12(1);
        gnu.realsize = octal12(size);
        h.set_cksum();
        self.b.append(&h, &b"x"[..]).expect("append to memory");
        self
    }

    /// A whiteout hiding `dir/name`.
    pub fn whiteout(&mut self, dir: &str, name: &str) -> &mut Self {
        let p = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&p, 0o644, &[])
    }

    /// An opaque marker for `dir`.
    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        self.file(&format!("{dir}/.wh..wh..opq"), 0o644, &[])
    }

    /// The finished (uncompressed) tar.
    pub fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()));
        b.into_inner().expect("finish tar")
    }
}

fn octal12(n: u64) -> [u8; 12] {
    let s = format!("{n:011o}\0");
    s.as_bytes().try_into().expect("fits 12 bytes")
}

/// gzip-compresses.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// zstd-compresses.
pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).expect("zstd")
}
