//! Finding the guest kernel: the project's own (`/var/lib/skiff/kernels/
//! current/vmlinux`, everything built in), else Debian's cloud kernel from
//! `/boot` (its virtio drivers are modules the initramfs must carry). A
//! bzImage is turned into a PVH vmlinux once and cached; if that fails the
//! bzImage boots as it is.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Errors of finding or preparing a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No kernel was given and none was found.
    #[error("no guest kernel: none at {project}/current/vmlinux and no /boot/vmlinuz-*-cloud-amd64 (install linux-image-cloud-amd64, run scripts/build-kernel, or pass --kernel)")]
    NotFound {
        /// The project kernel directory searched.
        project: String,
    },
    /// The kernel file cannot be read.
    #[error("cannot read kernel {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The file is neither an ELF vmlinux nor a bzImage.
    #[error("{0} is neither an ELF vmlinux nor a bzImage")]
    Format(PathBuf),
}

/// Where a kernel came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelOrigin {
    /// Given on the command line.
    Explicit,
    /// The project's kernel (scripts/build-kernel).
    Project,
    /// A distribution kernel found in /boot.
    Distribution,
}

/// A guest kernel to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The file skiff-vmm boots (vmlinux or bzImage).
    pub path: PathBuf,
    /// Its release (`uname -r`), when it could be read.
    pub version: Option<String>,
    /// Modules under /lib/modules/<version> the initramfs should carry
    /// (false for kernels with the drivers built in).
    pub needs_modules: bool,
    /// Where it came from.
    pub origin: KernelOrigin,
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let origin = match self.origin {
            KernelOrigin::Explicit => "given",
            KernelOrigin::Project => "project kernel",
            KernelOrigin::Distribution => "distribution kernel",
        };
        let version = self.version.as_deref().unwrap_or("unknown version");
        let modules = if self.needs_modules { ", virtio drivers as modules" } else { "" };
        write!(f, "{} ({origin} {version}{modules})", self.path.display())
    }
}

/// Where to look; the defaults are the real host paths.
#[derive(Debug, Clone)]
pub struct KernelSearch {
    /// The project's kernel cache (`$SKIFF_KERNEL_CACHE` or /var/lib/skiff/kernels).
    pub project_dir: PathBuf,
    /// Where distribution kernels are (/boot).
    pub boot_dir: PathBuf,
    /// Where their modules are (/lib/modules).
    pub modules_dir: PathBuf,
    /// Where an extracted vmlinux may be cached.
    pub cache_dir: PathBuf,
}

impl KernelSearch {
    /// The host's real locations, with `cache_dir` for extracted kernels.
    pub fn host(cache_dir: &Path) -> Self {
        let project = std::env::var_os("SKIFF_KERNEL_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/skiff/kernels"));
        KernelSearch {
            project_dir: project,
            boot_dir: "/boot".into(),
            modules_dir: "/lib/modules".into(),
            cache_dir: cache_dir.to_path_buf(),
        }
    }

    fn needs_modules(&self, version: Option<&str>) -> bool {
        version.is_some_and(|v| self.modules_dir.join(v).join("modules.dep").is_file())
    }

    /// The kernel to boot: `explicit`, else the project's, else the newest
    /// cloud kernel in /boot.
    pub fn find(&self, explicit: Option<&Path>) -> Result<Kernel, KernelError> {
        if let Some(p) = explicit {
            let version = kernel_version(p)?;
            let needs_modules = self.needs_modules(version.as_deref());
            return Ok(Kernel { path: p.to_path_buf(), version, needs_modules, origin: KernelOrigin::Explicit });
        }
        let project = self.project_dir.join("current/vmlinux");
        if project.is_file() {
            let version = std::fs::read_to_string(self.project_dir.join("current/release"))
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .or_else(|| kernel_version(&project).ok().flatten());
            return Ok(Kernel { path: project, version, needs_modules: false, origin: KernelOrigin::Project });
        }
        let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(&self.boot_dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let v = name.strip_prefix("vmlinuz-")?.to_string();
                        v.ends_with("-cloud-amd64").then(|| (v, e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        found.sort_by(|a, b| version_cmp(&a.0, &b.0));
        let Some((version, bzimage)) = found.pop() else {
            return Err(KernelError::NotFound { project: self.project_dir.display().to_string() });
        };
        let path = extract_cached(&bzimage, &self.cache_dir.join(format!("vmlinux-{version}"))).unwrap_or(bzimage);
        let needs_modules = self.needs_modules(Some(&version));
        Ok(Kernel { path, version: Some(version), needs_modules, origin: KernelOrigin::Distribution })
    }
}

/// Compares version strings with runs of digits compared as numbers.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut chars = s.chars().peekable();
        while chars.peek().is_some() {
            let mut digits = String::new();
            while let Some(c) = chars.peek().filter(|c| c.is_ascii_digit()) {
                digits.push(*c);
                chars.next();
            }
            let mut text = String::new();
            while let Some(c) = chars.peek().filter(|c| !c.is_ascii_digit()) {
                text.push(*c);
                chars.next();
            }
            out.push((digits.parse().unwrap_or(0), text));
        }
        out
    }
    parts(a).cmp(&parts(b))
}

/// The release string of a vmlinux (its `Linux version X ` banner) or a
/// bzImage (the header's kernel_version string).
pub fn kernel_version(path: &Path) -> Result<Option<String>, KernelError> {
    let data = std::fs::read(path).map_err(|e| KernelError::Read(path.into(), e))?;
    if data.starts_with(b"\x7fELF") {
        const BANNER: &[u8] = b"Linux version ";
        let found = data.windows(BANNER.len()).position(|w| w == BANNER);
        return Ok(found.and_then(|i| first_word(&data[i + BANNER.len()..])));
    }
    if data.len() > 0x210 && &data[0x202..0x206] == b"HdrS" {
        let ptr = u16::from_le_bytes([data[0x20e], data[0x20f]]) as usize + 0x200;
        return Ok(data.get(ptr..).and_then(first_word));
    }
    Err(KernelError::Format(path.into()))
}

fn first_word(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().take(128).position(|b| *b == b' ' || *b == 0)?;
    let s = std::str::from_utf8(&bytes[..end]).ok()?;
    (!s.is_empty()).then(|| s.to_string())
}

/// The vmlinux inside `bzimage`, cached at `out` (reused while newer than
/// the bzImage). `None` when it cannot be extracted.
fn extract_cached(bzimage: &Path, out: &Path) -> Option<PathBuf> {
    let newer = |a: &Path, b: &Path| -> Option<bool> {
        Some(std::fs::metadata(a).ok()?.modified().ok()? >= std::fs::metadata(b).ok()?.modified().ok()?)
    };
    if newer(out, bzimage) == Some(true) {
        return Some(out.to_path_buf());
    }
    let elf = extract_vmlinux(&std::fs::read(bzimage).ok()?)?;
    std::fs::create_dir_all(out.parent()?).ok()?;
    let tmp = out.with_extension(format!("tmp.{}", std::process::id()));
    let written = std::fs::write(&tmp, elf).and_then(|_| std::fs::rename(&tmp, out));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return None;
    }
    Some(out.to_path_buf())
}

/// Decompresses the payload of a bzImage (scripts/extract-vmlinux in Rust,
/// with the same external decompressors); `None` unless it is an ELF.
pub fn extract_vmlinux(img: &[u8]) -> Option<Vec<u8>> {
    if img.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let setup_sects = match *img.get(0x1f1)? {
        0 => 4,
        n => n as usize,
    };
    let u32_at = |o: usize| Some(u32::from_le_bytes(img.get(o..o + 4)?.try_into().ok()?) as usize);
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    let payload = img.get(start..start + u32_at(0x24c)?)?;
    let tool: &[&str] = match payload.get(..4)? {
        [0x02, 0x21, 0x4c, 0x18] => &["lz4", "-dc"],
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        [0xfd, 0x37, 0x7a, 0x58] => &["xz", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd] => &["zstd", "-qdc"],
        _ => return None,
    };
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let input = payload.to_vec();
    // The decompressor stops reading at the end of its stream: errors
    // writing the (padded) rest are expected.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut out = Vec::new();
    let read = child.stdout.take()?.read_to_end(&mut out);
    let _ = feeder.join();
    let _ = child.wait();
    (read.is_ok() && out.starts_with(b"\x7fELF")).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bzimage(version: &str) -> Vec<u8> {
        let mut img = vec![0u8; 0x400];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20e..0x210].copy_from_slice(&(0x300u16 - 0x200).to_le_bytes());
        let v = format!("{version} (debian-kernel@lists.debian.org) #1 SMP\0");
        img[0x300..0x300 + v.len()].copy_from_slice(v.as_bytes());
        img
    }

    #[test]
    fn versions_of_bzimage_and_vmlinux() {
        let dir = tempfile::tempdir().unwrap();
        let bz = dir.path().join("vmlinuz");
        std::fs::write(&bz, bzimage("6.1.0-56-cloud-amd64")).unwrap();
        assert_eq!(kernel_version(&bz).unwrap().as_deref(), Some("6.1.0-56-cloud-amd64"));
        let elf = dir.path().join("vmlinux");
        std::fs::write(&elf, b"\x7fELF....Linux version 6.1.192-skiff (root@x) #1\0").unwrap();
        assert_eq!(kernel_version(&elf).unwrap().as_deref(), Some("6.1.192-skiff"));
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"hello").unwrap();
        assert!(matches!(kernel_version(&junk), Err(KernelError::Format(_))));
    }

    #[test]
    fn version_order_is_numeric() {
        let mut v = vec!["6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64", "5.10.0-30-cloud-amd64"];
        v.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(v, ["5.10.0-30-cloud-amd64", "6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64"]);
    }

    #[test]
    fn project_kernel_first_then_newest_cloud_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let search = KernelSearch {
            project_dir: d.join("kernels"),
            boot_dir: d.join("boot"),
            modules_dir: d.join("modules"),
            cache_dir: d.join("cache"),
        };
        assert!(matches!(search.find(None), Err(KernelError::NotFound { .. })));
        std::fs::create_dir_all(d.join("boot")).unwrap();
        for v in ["6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64", "6.1.0-99-amd64"] {
            std::fs::write(d.join(format!("boot/vmlinuz-{v}")), bzimage(v)).unwrap();
        }
        std::fs::create_dir_all(d.join("modules/6.1.0-56-cloud-amd64")).unwrap();
        std::fs::write(d.join("modules/6.1.0-56-cloud-amd64/modules.dep"), "").unwrap();
        let k = search.find(None).unwrap();
        // The fake bzImage has no payload: it boots as it is.
        assert_eq!(k.path, d.join("boot/vmlinuz-6.1.0-56-cloud-amd64"));
        assert_eq!(k.version.as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert!(k.needs_modules);
        assert_eq!(k.origin, KernelOrigin::Distribution);

        std::fs::create_dir_all(d.join("kernels/current")).unwrap();
        std::fs::write(d.join("kernels/current/vmlinux"), b"\x7fELF Linux version 6.1.192 x").unwrap();
        let k = search.find(None).unwrap();
        assert_eq!(k.origin, KernelOrigin::Project);
        assert_eq!(k.version.as_deref(), Some("6.1.192"));
        assert!(!k.needs_modules);

        let explicit = d.join("boot/vmlinuz-6.1.0-99-amd64");
        let k = search.find(Some(&explicit)).unwrap();
        assert_eq!((k.origin, k.needs_modules), (KernelOrigin::Explicit, false));
    }

    #[test]
    fn extracts_the_hosts_cloud_kernel_when_present() {
        let search = KernelSearch::host(Path::new("/nonexistent"));
        let Ok(k) = search.find(None) else { return };
        if k.origin != KernelOrigin::Distribution {
            return;
        }
        let bz = search.boot_dir.join(format!("vmlinuz-{}", k.version.unwrap()));
        if let Ok(img) = std::fs::read(bz) {
            if let Some(elf) = extract_vmlinux(&img) {
                assert!(elf.starts_with(b"\x7fELF"));
            }
        }
    }
}
