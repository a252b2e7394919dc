//! Command-line arguments.

use std::path::PathBuf;

use clap::Parser;
use skiff_agent_proto::AGENT_VSOCK_PORT;

/// Skiff's guest agent. As PID 1 it is the thin VM's init; otherwise (a
/// service in a full OS VM, or a test on the host) it only serves.
#[derive(Debug, Parser)]
#[command(name = "skiff-agent", version)]
pub struct Args {
    /// Where to listen: `vsock:PORT` or `unix:PATH`.
    #[arg(long, default_value_t = format!("vsock:{AGENT_VSOCK_PORT}"))]
    pub listen: String,
    /// Where to send the ready and main-exit events: `vsock:PORT` (to the
    /// host, CID 2), `unix:PATH`, or `none`. Default: vsock:1025 as PID 1,
    /// none otherwise.
    #[arg(long)]
    pub notify: Option<String>,
    /// Run the thin-VM init sequence even when not PID 1 (never in tests:
    /// it mounts and switches root).
    #[arg(long)]
    pub init: bool,
    /// OCI runtime-spec config.json whose process to start as the main
    /// process (PID 1 default: `/skiff/config.json` if present).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// virtio-fs tag of the rootfs, or `none` to stay in the initramfs
    /// (overrides the kernel command line's `skiff.rootfs=`).
    #[arg(long)]
    pub rootfs: Option<String>,
    /// Do not write the boot-complete marker to I/O port 0x3f0 as PID 1
    /// (for PID-1 tests in a pid namespace on a real machine).
    #[arg(long)]
    pub no_boot_mark: bool,
    /// Do not load kernel modules in the init sequence (kernels with
    /// everything built in; PID-1 tests on a real machine).
    #[arg(long)]
    pub no_modules: bool,
    /// PID 1 of a container (Skiff's LXC driver): the container manager
    /// made the mounts, so no init sequence, boot marker or CPU and memory
    /// hot-plug; it still reaps orphans, runs the main process from
    /// `--config` and ends the container when the main process ends.
    #[arg(long, conflicts_with = "init")]
    pub container: bool,
    /// Go to the background once listening (fork, new session; the parent
    /// exits 0 when the socket is ready), for starting the agent in a
    /// system container from outside.
    #[arg(long)]
    pub daemon: bool,
}

/// A parsed `--listen` / `--notify` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// AF_VSOCK port (listen: any CID; notify: the host, CID 2).
    Vsock(u32),
    /// A Unix socket path.
    Unix(PathBuf),
}

/// Parses `vsock:PORT` or `unix:PATH`.
pub fn parse_address(s: &str) -> Option<Address> {
    if let Some(port) = s.strip_prefix("vsock:") {
        return port.parse().ok().map(Address::Vsock);
    }
    s.strip_prefix("unix:")
        .filter(|p| !p.is_empty())
        .map(|p| Address::Unix(p.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_address("vsock:1024"), Some(Address::Vsock(1024)));
        assert_eq!(
            parse_address("unix:/tmp/a.sock"),
            Some(Address::Unix("/tmp/a.sock".into()))
        );
        for bad in ["vsock:x", "unix:", "tcp:1", "1024"] {
            assert_eq!(parse_address(bad), None, "{bad}");
        }
    }
}
