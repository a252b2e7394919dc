//! `skiff-vmm`: runs one VM. See `skiff-vmm --help`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use skiff_vmm::builder::{build_vm, BuildError};
use skiff_vmm::config::{SerialConfig, VmConfig, DEFAULT_CMDLINE};
use skiff_vmm::device_manager::DeviceConfig;
use skiff_vmm::firmware::FirmwareConfig;
use skiff_vmm::options::{ConsoleOption, CpusOption, DiskOption, FsOption, MemoryOption, NetOption, VsockOption};
use skiff_vmm::snapshot::restore::{restore_vm, RestoreConfig};

/// Skiff's virtual machine monitor: boots one Linux VM on KVM.
///
/// Exit status: 0 when the guest powers off or reboots (a reboot: see
/// `--reset-exit-code`), or the VMM is stopped (SIGTERM, SIGINT, the API's
/// `vm.power-off`); 1 when the VM fails (triple fault,
/// unhandled exit, KVM error); 2 for bad arguments or files (a damaged or
/// mismatched snapshot included), before any vCPU runs; 3 when the guest
/// kernel panics.
#[derive(Parser, Debug)]
#[command(name = "skiff-vmm", version, about, long_about)]
struct Args {
    /// Guest kernel: an uncompressed vmlinux (booted through PVH when it has
    /// the PVH note) or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["restore", "firmware"])]
    kernel: Option<PathBuf>,
    /// Boot UEFI firmware instead of a kernel: an OVMF code image (default
    /// Debian's /usr/share/OVMF/OVMF_CODE_4M.fd), mapped read-only at the
    /// top of 4 GiB. Needs `--firmware-vars`. The firmware finds the
    /// memory, CPUs and Skiff's ACPI tables through QEMU's fw_cfg, an
    /// i440FX/PIIX chipset, a CMOS clock; its debug console (port 0x402)
    /// goes to the VMM log.
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = skiff_vmm::firmware::DEFAULT_FIRMWARE,
          requires = "firmware_vars", conflicts_with_all = ["kernel", "initramfs", "restore"])]
    firmware: Option<PathBuf>,
    /// The VM's UEFI variable store (its own copy of OVMF_VARS*.fd, written
    /// through as the firmware changes variables, so they persist). Created
    /// from the firmware's sibling (OVMF_CODE_4M.fd → OVMF_VARS_4M.fd) if
    /// it does not exist.
    #[arg(long, value_name = "PATH", requires = "firmware")]
    firmware_vars: Option<PathBuf>,
    /// The VM's UUID, which a firmware-booted guest reads as its SMBIOS
    /// system UUID (Linux: /sys/class/dmi/id/product_uuid); give the same
    /// one on every boot of the same VM. Default: a random one (logged).
    #[arg(long, value_name = "UUID", requires = "firmware")]
    uuid: Option<uuid::Uuid>,
    /// Restore the VM saved in DIR by the API's `vm.snapshot` instead of
    /// booting one: its vCPUs, memory (the file mapped privately; copied
    /// into shared memory for a VM with virtio-fs) and devices. `--disk`,
    /// `--net`, `--vsock`, `--fs` and `--rng` then give a saved device's
    /// host side anew (matched by id: `id=`, or disk0, net0, fs0, ... as
    /// at boot); saved devices not given keep their saved paths, tap and
    /// sockets. A share needs a fresh virtiofsd for the same directory on
    /// its socket. `--serial` and `--api-socket` apply as usual.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initramfs", "cpus", "memory", "console"])]
    restore: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed) loaded at the top of low RAM.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// vCPUs (1–254): `N`, or `boot=N,max=M` to allow hot-plugging up to
    /// M through the API's `vm.resize`.
    #[arg(long, value_name = "N|boot=N,max=M", default_value = "1")]
    cpus: CpusOption,
    /// Guest memory in MiB (at least 32, at most the host's RAM): `MIB`, or
    /// `size=MIB,hotplug=MIB` to add a hot-plug region (a multiple of 128
    /// MiB) that `vm.resize` plugs into and unplugs from through virtio-mem.
    /// The guest needs the virtio_mem driver and must online hot-plugged
    /// memory itself: boot Linux with `memhp_default_state=online_movable`
    /// (movable, so that it can be unplugged again) or a udev rule.
    #[arg(long, value_name = "MIB|size=MIB,hotplug=MIB", default_value = "512")]
    memory: MemoryOption,
    /// Where COM1 goes: `stdout` (stdin is fed to the guest), `file=PATH`
    /// (appended, rotated at 16 MiB), or `off`; `socket=PATH` (alone or
    /// after `file=PATH,`) also serves it on a Unix socket whose one client
    /// sees the output and types into the guest (an interactive console;
    /// a new client replaces the old).
    #[arg(long, value_name = "stdout|file=PATH|off[,socket=PATH]", default_value = "stdout")]
    serial: SerialConfig,
    /// Unix socket for the control API: HTTP/1.1 with JSON bodies (info,
    /// pause, resume, shutdown, power-off, device hot-plug, resize,
    /// counters); `skiff-vmm-ctl` is its command-line client.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// A virtio-blk disk backed by a raw or qcow2 image; repeatable. Keys:
    /// `path=` (required), `format=raw|qcow2` (default raw; a file that
    /// starts with the qcow2 magic is refused unless a format is given, and
    /// raw is never probed; a qcow2 image's backing chain must record its
    /// formats), `readonly=on|off`, `serial=` (the ID the guest reads),
    /// `id=` (the device's id in the API; default diskN).
    #[arg(long = "disk", value_name = "path=P[,format=raw|qcow2][,readonly=on][,serial=S][,id=ID]")]
    disks: Vec<DiskOption>,
    /// A virtio-net NIC on a tap device (created if missing) or an inherited
    /// tap fd; repeatable. Keys: `tap=NAME` or `fd=N`, `mac=MAC`, `id=`.
    #[arg(long = "net", value_name = "tap=NAME|fd=N[,mac=MAC][,id=ID]")]
    nets: Vec<NetOption>,
    /// A virtio-vsock device for guest context ID `cid`, with the host side
    /// on a Unix socket (Firecracker's hybrid model: connect and send
    /// `CONNECT <port>\n`; guest connections to port P go to `PATH_P`).
    #[arg(long, value_name = "cid=N,socket=PATH[,id=ID]")]
    vsock: Option<VsockOption>,
    /// A virtio-fs share served by virtiofsd on a vhost-user socket;
    /// repeatable (one per tag). The guest mounts it with
    /// `mount -t virtiofs TAG DIR`.
    #[arg(long = "fs", value_name = "tag=T,socket=PATH[,id=ID]")]
    fs: Vec<FsOption>,
    /// A virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// A virtio-console (the guest's hvc0) to a file or a Unix socket.
    #[arg(long, value_name = "file=PATH|socket=PATH")]
    console: Option<ConsoleOption>,
    /// Exit status when the guest resets (reboots) the machine; default 0,
    /// as for a power-off. A caller that boots the VM again on a reboot
    /// gives another value to tell the two apart (skiff-run's full OS VMs
    /// use 4 and start the VMM again on the same disk and variable store).
    #[arg(long, value_name = "CODE", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=255))]
    reset_exit_code: u8,
}

fn print_error(prefix: &str, err: &dyn std::error::Error) {
    eprintln!("skiff-vmm: {prefix}{}", skiff_vmm::error_chain(err));
}

fn main() -> ExitCode {
    let start = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| writeln!(buf, "[skiff-vmm {}] {}", record.level(), record.args()))
        .init();
    let args = Args::parse();
    let devices = DeviceConfig {
        disks: args.disks,
        nets: args.nets,
        vsock: args.vsock,
        fs: args.fs,
        rng: args.rng,
        console: args.console,
    };
    if let Some(dir) = args.restore {
        let config = RestoreConfig { dir, serial: args.serial, api_socket: args.api_socket, devices };
        return match restore_vm(&config, start) {
            Ok(vmm) => {
                log::info!("restored {} ms after start", start.elapsed().as_millis());
                run(vmm, args.reset_exit_code)
            }
            Err(e) => {
                print_error("cannot restore: ", &e);
                ExitCode::from(if e.is_bad_input() { 2 } else { 1 })
            }
        };
    }
    let config = VmConfig {
        kernel: args.kernel.unwrap_or_default(),
        initramfs: args.initramfs,
        cmdline: args.cmdline,
        cpus: args.cpus.boot,
        max_cpus: args.cpus.max,
        memory_mib: args.memory.size_mib,
        hotplug_mib: args.memory.hotplug_mib,
        serial: args.serial,
        api_socket: args.api_socket,
        devices,
        firmware: args.firmware.map(|code| FirmwareConfig {
            code,
            vars: args.firmware_vars.unwrap_or_default(),
            uuid: args.uuid.unwrap_or_else(uuid::Uuid::new_v4),
        }),
    };
    if let Err(e) = config.validate() {
        print_error("", &e);
        return ExitCode::from(2);
    }
    let vmm = match build_vm(&config, start) {
        Ok(v) => v,
        Err(e) => {
            print_error("", &e);
            let bad_input = matches!(&e, BuildError::Firmware(f) if f.is_bad_input());
            return ExitCode::from(if bad_input { 2 } else { 1 });
        }
    };
    log::debug!("VM built {} ms after start", start.elapsed().as_millis());
    run(vmm, args.reset_exit_code)
}

fn run(vmm: skiff_vmm::vmm::Vmm, reset_exit_code: u8) -> ExitCode {
    match vmm.run() {
        Ok(reason) => {
            let code = match reason {
                skiff_vmm::exit::ExitReason::Reset => i32::from(reset_exit_code),
                _ => reason.code(),
            };
            if code == 0 {
                log::info!("{reason}");
            } else {
                log::error!("{reason}");
            }
            let _ = std::io::stdout().flush();
            ExitCode::from(code as u8)
        }
        Err(e) => {
            print_error("", &e);
            ExitCode::from(1)
        }
    }
}
