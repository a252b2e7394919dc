//! `skiff-vmm`: runs one VM. See `skiff-vmm --help`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use skiff_vmm::builder::build_vm;
use skiff_vmm::config::{SerialConfig, VmConfig, DEFAULT_CMDLINE};
use skiff_vmm::device_manager::DeviceConfig;
use virtio_devices::block::BlockConfig;
use virtio_devices::config::{NetConfig, VsockConfig};
use virtio_devices::console::ConsoleOutput;
use virtio_devices::fs::FsConfig;

/// Skiff's virtual machine monitor: boots one Linux VM on KVM.
///
/// Exit status: 0 when the guest powers off or reboots, or the VMM is
/// stopped (SIGTERM, SIGINT, API `stop`); 1 when the VM fails (triple fault,
/// unhandled exit, KVM error); 2 for bad arguments or files, before any VM
/// is created; 3 when the guest kernel panics.
#[derive(Parser, Debug)]
#[command(name = "skiff-vmm", version, about, long_about)]
struct Args {
    /// Guest kernel: an uncompressed vmlinux (booted through PVH when it has
    /// the PVH note) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initramfs (cpio, optionally compressed) loaded at the top of low RAM.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs (1–254).
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u8,
    /// Guest memory in MiB (at least 32, at most the host's RAM).
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    memory: u64,
    /// Where COM1 goes: `stdout` (stdin is fed to the guest), `file=PATH`
    /// (appended), or `off`.
    #[arg(long, value_name = "stdout|file=PATH|off", default_value = "stdout")]
    serial: SerialConfig,
    /// Unix socket for the control API (JSON lines: ping, info, stop).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// A virtio-blk disk backed by a raw image; repeatable. Keys: `path=`
    /// (required), `readonly=on|off`, `serial=` (the ID the guest reads).
    #[arg(long = "disk", value_name = "path=P[,readonly=on][,serial=S]")]
    disks: Vec<BlockConfig>,
    /// A virtio-net NIC on a tap device (created if missing) or an inherited
    /// tap fd; repeatable. Keys: `tap=NAME` or `fd=N`, `mac=MAC`.
    #[arg(long = "net", value_name = "tap=NAME|fd=N[,mac=MAC]")]
    nets: Vec<NetConfig>,
    /// A virtio-vsock device for guest context ID `cid`, with the host side
    /// on a Unix socket (Firecracker's hybrid model: connect and send
    /// `CONNECT <port>\n`; guest connections to port P go to `PATH_P`).
    #[arg(long, value_name = "cid=N,socket=PATH")]
    vsock: Option<VsockConfig>,
    /// A virtio-fs share served by virtiofsd on a vhost-user socket;
    /// repeatable (one per tag). The guest mounts it with
    /// `mount -t virtiofs TAG DIR`.
    #[arg(long = "fs", value_name = "tag=T,socket=PATH")]
    fs: Vec<FsConfig>,
    /// A virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// A virtio-console (the guest's hvc0) to a file or a Unix socket.
    #[arg(long, value_name = "file=PATH|socket=PATH")]
    console: Option<ConsoleOutput>,
}

fn print_error(prefix: &str, err: &dyn std::error::Error) {
    let mut msg = format!("skiff-vmm: {prefix}{err}");
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    eprintln!("{msg}");
}

fn main() -> ExitCode {
    let start = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| writeln!(buf, "[skiff-vmm {}] {}", record.level(), record.args()))
        .init();
    let args = Args::parse();
    let config = VmConfig {
        kernel: args.kernel,
        initramfs: args.initramfs,
        cmdline: args.cmdline,
        cpus: args.cpus,
        memory_mib: args.memory,
        serial: args.serial,
        api_socket: args.api_socket,
        devices: DeviceConfig {
            disks: args.disks,
            nets: args.nets,
            vsock: args.vsock,
            fs: args.fs,
            rng: args.rng,
            console: args.console,
        },
    };
    if let Err(e) = config.validate() {
        print_error("", &e);
        return ExitCode::from(2);
    }
    let vmm = match build_vm(&config, start) {
        Ok(v) => v,
        Err(e) => {
            print_error("", &e);
            return ExitCode::from(1);
        }
    };
    log::debug!("VM built {} ms after start", start.elapsed().as_millis());
    match vmm.run() {
        Ok(reason) => {
            let code = reason.code();
            if code == 0 {
                log::info!("{reason}");
            } else {
                log::error!("{reason}");
            }
            let _ = std::io::stdout().flush();
            // Exit without unwinding: vCPU threads may still be inside KVM_RUN.
            std::process::exit(code)
        }
        Err(e) => {
            print_error("", &e);
            ExitCode::from(1)
        }
    }
}
