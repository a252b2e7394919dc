//! Builds guest initramfs images (uncompressed `newc` cpio: the kernel
//! unpacks it without a decompressor, which is the fastest to boot).
//!
//! An [`Initramfs`] is a tree of entries added by path; parents are created
//! as needed and the archive is written sorted, with fixed timestamps and
//! owners, so the same inputs always give the same bytes. [`modules`] finds
//! kernel modules and their dependencies for a kernel version.

pub mod cpio;
pub mod modules;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use cpio::{CpioWriter, Header, S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG};

/// Errors while assembling or writing an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the archive")]
    Write(#[source] std::io::Error),
    #[error("invalid archive path '{0}': must be relative, without '..' or empty components")]
    BadPath(String),
    #[error("{path} is {size} bytes; cpio members are limited to 4 GiB")]
    TooLarge { path: String, size: u64 },
}

#[derive(Debug, Clone)]
enum Node {
    Dir { mode: u32 },
    File { data: Vec<u8>, mode: u32 },
    Symlink { target: String },
    CharDev { mode: u32, major: u32, minor: u32 },
}

/// An initramfs being assembled.
#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    nodes: BTreeMap<String, Node>,
}

fn normalize(path: &str) -> Result<String, InitramfsError> {
    let trimmed = path.trim_start_matches('/');
    if trimmed.is_empty() || trimmed.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(InitramfsError::BadPath(path.to_string()));
    }
    Ok(trimmed.to_string())
}

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<&mut Self, InitramfsError> {
        let path = normalize(path)?;
        let mut parent = String::new();
        for comp in path.split('/').collect::<Vec<_>>().iter().rev().skip(1).rev() {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(comp);
            self.nodes.entry(parent.clone()).or_insert(Node::Dir { mode: 0o755 });
        }
        self.nodes.insert(path, node);
        Ok(self)
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, InitramfsError> {
        self.insert(path, Node::Dir { mode })
    }

    /// Adds a file with the given contents.
    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Result<&mut Self, InitramfsError> {
        let data = data.into();
        if data.len() as u64 > u64::from(u32::MAX) {
            return Err(InitramfsError::TooLarge { path: path.into(), size: data.len() as u64 });
        }
        self.insert(path, Node::File { data, mode })
    }

    /// Adds a copy of the host file `src`.
    pub fn file(&mut self, path: &str, src: &Path, mode: u32) -> Result<&mut Self, InitramfsError> {
        let data = std::fs::read(src).map_err(|source| InitramfsError::Read { path: src.into(), source })?;
        self.bytes(path, data, mode)
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, InitramfsError> {
        self.insert(path, Node::Symlink { target: target.into() })
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> Result<&mut Self, InitramfsError> {
        self.insert(path, Node::CharDev { mode, major, minor })
    }

    /// The usual skeleton: /dev with a console, /proc, /sys, /run, /tmp.
    pub fn skeleton(&mut self) -> Result<&mut Self, InitramfsError> {
        self.char_dev("dev/console", 0o600, 5, 1)?;
        self.char_dev("dev/null", 0o666, 1, 3)?;
        for d in ["proc", "sys", "run", "tmp", "root", "etc"] {
            self.dir(d, if d == "tmp" { 0o1777 } else { 0o755 })?;
        }
        Ok(self)
    }

    /// Adds a static busybox at /bin/busybox with /bin/sh pointing at it.
    pub fn busybox(&mut self, src: &Path) -> Result<&mut Self, InitramfsError> {
        self.file("bin/busybox", src, 0o755)?;
        self.symlink("bin/sh", "busybox")
    }

    /// Writes the archive.
    pub fn write_to<W: Write>(&self, out: W) -> Result<W, InitramfsError> {
        let mut w = CpioWriter::new(out);
        for (name, node) in &self.nodes {
            let (mode, data, major, minor): (u32, &[u8], u32, u32) = match node {
                Node::Dir { mode } => (S_IFDIR | mode, &[], 0, 0),
                Node::File { data, mode } => (S_IFREG | mode, data, 0, 0),
                Node::Symlink { target } => (S_IFLNK | 0o777, target.as_bytes(), 0, 0),
                Node::CharDev { mode, major, minor } => (S_IFCHR | mode, &[], *major, *minor),
            };
            let h =
                Header { name, mode, uid: 0, gid: 0, rdev_major: major, rdev_minor: minor, size: data.len() as u32 };
            w.entry(&h, data).map_err(InitramfsError::Write)?;
        }
        w.finish().map_err(InitramfsError::Write)
    }

    /// Writes the archive to `path` atomically (temporary file, then rename).
    pub fn write_file(&self, path: &Path) -> Result<(), InitramfsError> {
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let f = std::fs::File::create(&tmp).map_err(InitramfsError::Write)?;
        let res = self
            .write_to(std::io::BufWriter::new(f))
            .and_then(|mut w| w.flush().map_err(InitramfsError::Write))
            .and_then(|_| std::fs::rename(&tmp, path).map_err(InitramfsError::Write));
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_created_and_output_is_reproducible() {
        let mut a = Initramfs::new();
        a.skeleton().unwrap().bytes("/usr/lib/x/y", b"hello".to_vec(), 0o644).unwrap();
        let mut b = Initramfs::new();
        b.bytes("usr/lib/x/y", b"hello".to_vec(), 0o644).unwrap().skeleton().unwrap();
        let (oa, ob) = (a.write_to(Vec::new()).unwrap(), b.write_to(Vec::new()).unwrap());
        assert_eq!(oa, ob);
        for name in ["usr\0", "usr/lib\0", "usr/lib/x\0", "dev/console\0"] {
            assert!(oa.windows(name.len()).any(|w| w == name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn bad_paths_are_refused() {
        let mut a = Initramfs::new();
        for p in ["", "/", "a/../b", "a//b", "./x"] {
            assert!(matches!(a.bytes(p, b"".to_vec(), 0o644), Err(InitramfsError::BadPath(_))), "{p}");
        }
    }

    #[test]
    fn round_trips_through_cpio_tool() {
        let Ok(cpio) = which("cpio") else { return };
        let dir = tempfile::tempdir().unwrap();
        let arch = dir.path().join("a.cpio");
        let mut a = Initramfs::new();
        a.bytes("bin/hello", b"#!/bin/sh\necho hi\n".to_vec(), 0o755).unwrap().symlink("bin/hi", "hello").unwrap();
        a.write_file(&arch).unwrap();
        let out =
            std::process::Command::new(cpio).arg("-itv").stdin(std::fs::File::open(&arch).unwrap()).output().unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(listing.contains("-rwxr-xr-x") && listing.contains("bin/hello"));
        assert!(listing.contains("bin/hi -> hello"));
    }

    fn which(name: &str) -> Result<PathBuf, ()> {
        std::env::var_os("PATH")
            .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
            .ok_or(())
    }
}
