//! The thin-VM initramfs: the static `skiff-agent` as `/init`, plus the
//! kernel modules the devices need when the kernel has them as modules
//! (with `modules.load` giving the agent their load order). Built once per
//! agent hash and kernel version and cached.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use skiff_initramfs::modules::{ModuleIndex, ModulesError};
use skiff_initramfs::{Initramfs, InitramfsError};

use crate::kernel::Kernel;

/// The modules a thin VM needs (virtio over PCI, the rootfs share, the
/// agent's vsock, console and entropy; disk and network for later).
pub const THIN_VM_MODULES: &[&str] = &[
    "virtio_pci",
    "virtiofs",
    "vmw_vsock_virtio_transport",
    "virtio_console",
    "virtio_rng",
    "virtio_blk",
    "virtio_net",
];
/// Bumped when the layout of the image changes.
const FORMAT: u32 = 1;
/// Where the agent is looked for, relative to skiff-run's directory
/// (`target/release` → `target/guest/...`), then absolute.
const AGENT_CANDIDATES: &[&str] = &[
    "skiff-agent",
    "../guest/x86_64-unknown-linux-gnu/release/skiff-agent",
    "../../guest/x86_64-unknown-linux-gnu/release/skiff-agent",
    "/usr/local/lib/skiff/skiff-agent",
    "/usr/lib/skiff/skiff-agent",
];

/// Errors of building the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// No static agent was found.
    #[error("no static skiff-agent found (looked at {0}); run scripts/build-guest or pass --agent")]
    NoAgent(String),
    /// The agent is dynamically linked: it cannot be /init.
    #[error("{0} is dynamically linked; the initramfs needs the static build (scripts/build-guest)")]
    Dynamic(PathBuf),
    /// A file could not be read.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The modules could not be resolved.
    #[error("kernel modules for {0}")]
    Modules(String, #[source] ModulesError),
    /// Writing the image failed.
    #[error("writing {0}")]
    Write(PathBuf, #[source] InitramfsError),
    /// The cache directory could not be created.
    #[error("creating {0}")]
    CacheDir(PathBuf, #[source] std::io::Error),
}

/// Whether the ELF file `data` has no program interpreter (static).
pub fn is_static_elf(data: &[u8]) -> bool {
    if !data.starts_with(b"\x7fELF") || data.get(4) != Some(&2) {
        return false;
    }
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at = |o: usize| data.get(o..o + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..phnum).all(|i| {
        let off = phoff as usize + i * phentsize;
        data.get(off..off + 4).is_some_and(|t| t != 3u32.to_le_bytes())
    })
}

/// The static agent: `explicit`, `$SKIFF_AGENT`, or the usual places.
pub fn find_agent(explicit: Option<&Path>) -> Result<PathBuf, BuildError> {
    let check = |p: &Path| -> Result<PathBuf, BuildError> {
        let data = std::fs::read(p).map_err(|e| BuildError::Read(p.into(), e))?;
        if is_static_elf(&data) {
            Ok(p.to_path_buf())
        } else {
            Err(BuildError::Dynamic(p.into()))
        }
    };
    if let Some(p) = explicit.map(PathBuf::from).or_else(|| std::env::var_os("SKIFF_AGENT").map(PathBuf::from)) {
        return check(&p);
    }
    let exe_dir = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf));
    let mut tried = Vec::new();
    for c in AGENT_CANDIDATES {
        let p = match &exe_dir {
            Some(d) if !c.starts_with('/') => d.join(c),
            _ => PathBuf::from(c),
        };
        if p.is_file() {
            if let Ok(found) = check(&p) {
                return Ok(found);
            }
        }
        tried.push(p.display().to_string());
    }
    Err(BuildError::NoAgent(tried.join(", ")))
}

/// The cached image's file name: kernel version (or `builtin`), agent hash.
pub fn cache_name(agent_bytes: &[u8], kernel: &Kernel) -> String {
    let hash = hex::encode(Sha256::digest(agent_bytes));
    let kver = match (&kernel.version, kernel.needs_modules) {
        (Some(v), true) => v.as_str(),
        _ => "builtin",
    };
    format!("thin-{kver}-{}-v{FORMAT}.cpio", &hash[..16])
}

/// Builds the initramfs for `kernel` into `cache_dir`, or reuses the one
/// built before for the same agent and kernel version.
pub fn ensure(agent: &Path, kernel: &Kernel, modules_root: &Path, cache_dir: &Path) -> Result<PathBuf, BuildError> {
    let agent_bytes = std::fs::read(agent).map_err(|e| BuildError::Read(agent.into(), e))?;
    let out = cache_dir.join(cache_name(&agent_bytes, kernel));
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| BuildError::CacheDir(cache_dir.into(), e))?;
    let werr = |e| BuildError::Write(out.clone(), e);
    let mut fs = Initramfs::new();
    fs.skeleton().map_err(werr)?;
    fs.bytes("init", agent_bytes, 0o755).map_err(werr)?;
    if let (Some(version), true) = (&kernel.version, kernel.needs_modules) {
        let index = ModuleIndex::load(modules_root, version).map_err(|e| BuildError::Modules(version.clone(), e))?;
        let paths = index.resolve(THIN_VM_MODULES).map_err(|e| BuildError::Modules(version.clone(), e))?;
        let mut order = String::new();
        for path in paths {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            fs.file(&format!("lib/modules/{version}/{name}"), &path, 0o644).map_err(werr)?;
            order.push_str(&name);
            order.push('\n');
        }
        fs.bytes(&format!("lib/modules/{version}/modules.load"), order, 0o644).map_err(werr)?;
    }
    fs.write_file(&out).map_err(werr)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::KernelOrigin;

    fn elf(interp: bool) -> Vec<u8> {
        let mut d = vec![0u8; 0x40 + 2 * 56];
        d[..5].copy_from_slice(b"\x7fELF\x02");
        d[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        d[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        d[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        d[0x40..0x44].copy_from_slice(&1u32.to_le_bytes());
        d[0x40 + 56..0x44 + 56].copy_from_slice(&(if interp { 3u32 } else { 6 }).to_le_bytes());
        d
    }

    #[test]
    fn static_and_dynamic_elves() {
        assert!(is_static_elf(&elf(false)));
        assert!(!is_static_elf(&elf(true)));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
    }

    #[test]
    fn built_once_per_agent_and_kernel_with_modules_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ver = "6.1.0-test";
        let m = d.join("lib/modules").join(ver);
        std::fs::create_dir_all(m.join("kernel")).unwrap();
        let mut dep = String::new();
        for name in THIN_VM_MODULES {
            let deps = if *name == "virtio_pci" { "" } else { " kernel/virtio_pci.ko" };
            dep.push_str(&format!("kernel/{name}.ko:{deps}\n"));
            std::fs::write(m.join(format!("kernel/{name}.ko")), name.as_bytes()).unwrap();
        }
        std::fs::write(m.join("modules.dep"), dep).unwrap();
        let agent = d.join("agent");
        std::fs::write(&agent, elf(false)).unwrap();
        let kernel = Kernel {
            path: d.join("vmlinuz"),
            version: Some(ver.into()),
            needs_modules: true,
            origin: KernelOrigin::Distribution,
        };
        let cache = d.join("cache");
        let a = ensure(&agent, &kernel, d, &cache).unwrap();
        let bytes = std::fs::read(&a).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("virtio_pci.ko\nvirtiofs.ko\n"), "load order first: {text}");
        assert!(text.contains(&format!("lib/modules/{ver}/virtiofs.ko")));
        let modified = std::fs::metadata(&a).unwrap().modified().unwrap();
        assert_eq!(ensure(&agent, &kernel, d, &cache).unwrap(), a);
        assert_eq!(std::fs::metadata(&a).unwrap().modified().unwrap(), modified, "reused");

        let builtin = Kernel { needs_modules: false, ..kernel.clone() };
        let b = ensure(&agent, &builtin, d, &cache).unwrap();
        assert_ne!(a, b);
        assert!(!String::from_utf8_lossy(&std::fs::read(&b).unwrap()).contains("modules.load"));
        let mut other = elf(false);
        other.push(1);
        std::fs::write(&agent, other).unwrap();
        assert_ne!(ensure(&agent, &kernel, d, &cache).unwrap(), a, "a new agent, a new image");
    }
}
