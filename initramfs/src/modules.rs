//! Kernel modules for a guest kernel version, with their dependencies in
//! load order, read from `/lib/modules/<version>/modules.dep`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Errors while resolving modules.
#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("module '{name}' is not in {dep_file} (not built for this kernel, or built in)")]
    Unknown { name: String, dep_file: PathBuf },
}

/// The dependency graph of one kernel's modules.
pub struct ModuleIndex {
    root: PathBuf,
    // module name → (relative path, dependency names)
    deps: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
}

fn module_name(rel: &str) -> String {
    let file = rel.rsplit('/').next().unwrap_or(rel);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

impl ModuleIndex {
    /// Reads the index of `/lib/modules/<version>` under `root` (`/` on the host).
    pub fn load(root: &Path, version: &str) -> Result<Self, ModulesError> {
        let dir = root.join("lib/modules").join(version);
        let dep_file = dir.join("modules.dep");
        let text =
            std::fs::read_to_string(&dep_file).map_err(|source| ModulesError::Read { path: dep_file, source })?;
        let mut deps = HashMap::new();
        for line in text.lines() {
            let Some((module, rest)) = line.split_once(':') else { continue };
            let d = rest.split_whitespace().map(module_name).collect();
            deps.insert(module_name(module), (module.to_string(), d));
        }
        let builtin = std::fs::read_to_string(dir.join("modules.builtin"))
            .map(|t| t.lines().map(module_name).collect())
            .unwrap_or_default();
        Ok(Self { root: dir, deps, builtin })
    }

    /// Whether `name` is built into the kernel (needs no loading).
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&name.replace('-', "_"))
    }

    /// Host paths of `names` and everything they depend on, dependencies
    /// first, each once. Built-in modules are skipped.
    pub fn resolve(&self, names: &[&str]) -> Result<Vec<PathBuf>, ModulesError> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for name in names {
            let name = name.replace('-', "_");
            if self.is_builtin(&name) {
                continue;
            }
            self.visit(&name, &mut seen, &mut order)?;
        }
        Ok(order)
    }

    fn visit(&self, name: &str, seen: &mut HashSet<String>, order: &mut Vec<PathBuf>) -> Result<(), ModulesError> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let (rel, deps) = self
            .deps
            .get(name)
            .ok_or_else(|| ModulesError::Unknown { name: name.to_string(), dep_file: self.root.join("modules.dep") })?;
        // modules.dep lists the full closure; visiting keeps the order right.
        for d in deps.iter().rev() {
            self.visit(d, seen, order)?;
        }
        order.push(self.root.join(rel));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_come_first_once() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("lib/modules/6.1.0-test");
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(
            m.join("modules.dep"),
            "kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/fs/fuse/fuse.ko:\n\
             kernel/drivers/virtio/virtio_ring.ko:\n\
             kernel/drivers/virtio/virtio-pci.ko: kernel/drivers/virtio/virtio_ring.ko\n",
        )
        .unwrap();
        std::fs::write(m.join("modules.builtin"), "kernel/drivers/block/loop.ko\n").unwrap();
        let idx = ModuleIndex::load(dir.path(), "6.1.0-test").unwrap();
        let got = idx.resolve(&["virtiofs", "virtio-pci", "loop"]).unwrap();
        let names: Vec<_> = got.iter().map(|p| p.file_name().unwrap().to_string_lossy().to_string()).collect();
        assert_eq!(names, ["virtio_ring.ko", "fuse.ko", "virtiofs.ko", "virtio-pci.ko"]);
        assert!(matches!(idx.resolve(&["nope"]), Err(ModulesError::Unknown { .. })));
    }
}
