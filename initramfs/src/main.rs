//! `skiff-initramfs`: writes a guest initramfs (uncompressed newc cpio).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use skiff_initramfs::modules::ModuleIndex;
use skiff_initramfs::Initramfs;

/// Builds a guest initramfs: an init program, optionally busybox, extra
/// files, and kernel modules (with their dependencies) for a kernel version.
/// The output is reproducible: the same inputs give the same bytes.
#[derive(Parser, Debug)]
#[command(name = "skiff-initramfs", version, about, long_about)]
struct Args {
    /// Program or script to install as /init.
    #[arg(long, value_name = "PATH")]
    init: PathBuf,
    /// Static busybox to install as /bin/busybox (with /bin/sh).
    #[arg(long, value_name = "PATH")]
    busybox: Option<PathBuf>,
    /// Extra file, as HOST_PATH:ARCHIVE_PATH (mode kept); repeatable.
    #[arg(long = "file", value_name = "SRC:DEST")]
    files: Vec<String>,
    /// Kernel version whose modules --module names (from /lib/modules).
    #[arg(long, value_name = "VERSION")]
    kernel_version: Option<String>,
    /// Kernel module to include with its dependencies under
    /// /lib/modules/<version>/ (load order in /lib/modules/load-order); repeatable.
    #[arg(long = "module", value_name = "NAME")]
    modules: Vec<String>,
    /// Output file.
    #[arg(short, long, value_name = "PATH")]
    output: PathBuf,
}

fn mode_of(path: &std::path::Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.permissions().mode()
        & 0o7777)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut fs = Initramfs::new();
    fs.skeleton()?;
    fs.file("init", &args.init, 0o755)?;
    if let Some(bb) = &args.busybox {
        fs.busybox(bb)?;
    }
    for spec in &args.files {
        let Some((src, dest)) = spec.split_once(':') else { bail!("--file {spec}: expected SRC:DEST") };
        let src = PathBuf::from(src);
        fs.file(dest, &src, mode_of(&src)?)?;
    }
    if !args.modules.is_empty() {
        let Some(version) = &args.kernel_version else { bail!("--module needs --kernel-version") };
        let index = ModuleIndex::load(std::path::Path::new("/"), version)?;
        let names: Vec<&str> = args.modules.iter().map(String::as_str).collect();
        let mut order = String::new();
        for path in index.resolve(&names)? {
            let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            let dest = format!("lib/modules/{version}/{name}");
            fs.file(&dest, &path, 0o644)?;
            order.push_str(&format!("/{dest}\n"));
        }
        fs.bytes("lib/modules/load-order", order, 0o644)?;
    }
    fs.write_file(&args.output).with_context(|| format!("cannot write {}", args.output.display()))?;
    Ok(())
}
