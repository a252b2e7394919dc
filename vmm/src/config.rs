//! The VM configuration and its validation, done before any VM exists.

use std::path::PathBuf;
use std::str::FromStr;

use crate::arch::boot::{probe_initramfs, probe_kernel, BootError};
use crate::device_manager::DeviceConfig;

/// Smallest guest the VMM agrees to build.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Most vCPUs: APIC IDs are 8 bits and the IOAPIC takes the ID after them.
pub const MAX_CPUS: u8 = 254;
/// Kernel command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Where the guest's COM1 output goes, and its console socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialConfig {
    pub output: SerialSink,
    /// A Unix socket whose client sees the output and types into the UART
    /// ([`crate::devices::serial_socket`]).
    pub socket: Option<PathBuf>,
}

/// Where COM1's output is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialSink {
    /// stdout; stdin types into the UART.
    Stdout,
    /// Appended to a file (rotated).
    File(PathBuf),
    Off,
}

impl SerialConfig {
    /// stdout, no socket (the default).
    pub fn stdout() -> Self {
        SerialConfig { output: SerialSink::Stdout, socket: None }
    }
}

impl FromStr for SerialConfig {
    type Err = String;

    /// `stdout`, `off`, `file=PATH`, `socket=PATH`, or `file=PATH,socket=PATH`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| format!("invalid serial '{s}': {why}");
        let mut output = None;
        let mut socket = None;
        for part in s.split(',') {
            let (sink, sock) = match part {
                "stdout" => (Some(SerialSink::Stdout), None),
                "off" => (Some(SerialSink::Off), None),
                _ => match part.split_once('=') {
                    Some(("file", p)) if !p.is_empty() => (Some(SerialSink::File(PathBuf::from(p))), None),
                    Some(("socket", p)) if !p.is_empty() => (None, Some(PathBuf::from(p))),
                    _ => return Err(bad("expected stdout, off, file=PATH or socket=PATH (file= and socket= combine)")),
                },
            };
            if sink.is_some() && output.replace(sink).is_some() || sock.is_some() && socket.replace(sock).is_some() {
                return Err(bad("each of the output and the socket may be given once"));
            }
        }
        let output = output.flatten().unwrap_or(SerialSink::Off);
        let socket = socket.flatten();
        if output == SerialSink::Stdout && socket.is_some() {
            return Err(bad("stdout feeds stdin to the guest: it does not combine with socket="));
        }
        Ok(SerialConfig { output, socket })
    }
}

/// Everything needed to build the VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    /// vCPUs at boot.
    pub cpus: u8,
    /// Most vCPUs the VM can have (vCPU hot-plug); at least `cpus`.
    pub max_cpus: u8,
    /// Boot memory (in the e820 map).
    pub memory_mib: u64,
    /// Size of the virtio-mem hot-plug region above it; 0 for none.
    pub hotplug_mib: u64,
    pub serial: SerialConfig,
    pub api_socket: Option<PathBuf>,
    pub devices: DeviceConfig,
    /// Boot through this firmware instead of `kernel` (which is then
    /// unused).
    pub firmware: Option<crate::firmware::FirmwareConfig>,
}

/// Why a configuration cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--cpus must be between 1 and {MAX_CPUS}, got {0}")]
    Cpus(u64),
    #[error("--cpus max={max} is less than boot={boot}")]
    MaxCpus { boot: u8, max: u8 },
    #[error("--memory must be at least {MIN_MEMORY_MIB} MiB, got {0} MiB")]
    MemoryTooSmall(u64),
    #[error("--memory {asked} MiB (boot and hot-plug region) is more than this host's {host} MiB of RAM")]
    MemoryTooLarge { asked: u64, host: u64 },
    #[error("bad kernel")]
    Kernel(#[source] BootError),
    #[error("bad initramfs")]
    Initramfs(#[source] BootError),
    #[error("the initramfs ({size} MiB) leaves no room in {memory} MiB of guest memory")]
    InitramfsTooBig { size: u64, memory: u64 },
    #[error("the kernel command line is {0} bytes; Linux takes at most 2047")]
    Cmdline(usize),
    #[error("bad disk")]
    Disk(#[source] virtio_devices::block::BlockError),
    #[error("the vhost-user socket {0} of virtio-fs tag '{1}' does not exist (is virtiofsd running?)")]
    FsSocket(PathBuf, String),
    #[error("device id '{0}' is given twice")]
    IdTwice(String),
    #[error("virtio-fs tag '{0}' is given twice")]
    FsTagTwice(String),
    #[error("the API socket {0} already exists and a VMM answers on it")]
    ApiSocketInUse(PathBuf),
}

fn host_memory_mib() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages <= 0 || page <= 0 {
        return u64::MAX;
    }
    (pages as u64).saturating_mul(page as u64) >> 20
}

impl VmConfig {
    /// Checks sizes and reads the kernel and initramfs headers.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError::Cpus(u64::from(self.cpus)));
        }
        if self.max_cpus > MAX_CPUS {
            return Err(ConfigError::Cpus(u64::from(self.max_cpus)));
        }
        if self.max_cpus < self.cpus {
            return Err(ConfigError::MaxCpus { boot: self.cpus, max: self.max_cpus });
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        let host = host_memory_mib();
        let asked = self.memory_mib.saturating_add(self.hotplug_mib);
        if asked > host {
            return Err(ConfigError::MemoryTooLarge { asked, host });
        }
        if self.cmdline.len() >= crate::arch::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::Cmdline(self.cmdline.len()));
        }
        if self.firmware.is_none() {
            probe_kernel(&self.kernel).map_err(ConfigError::Kernel)?;
        }
        if let Some(initramfs) = &self.initramfs {
            let size = probe_initramfs(initramfs).map_err(ConfigError::Initramfs)?;
            if size >= (self.memory_mib << 20) / 2 {
                return Err(ConfigError::InitramfsTooBig { size: size >> 20, memory: self.memory_mib });
            }
        }
        let mut ids = std::collections::HashSet::new();
        let given = self.devices.disks.iter().filter_map(|d| d.id.as_deref());
        let given = given.chain(self.devices.nets.iter().filter_map(|n| n.id.as_deref()));
        let given = given.chain(self.devices.fs.iter().filter_map(|f| f.id.as_deref()));
        for id in given.chain(self.devices.vsock.iter().filter_map(|v| v.id.as_deref())) {
            if !ids.insert(id) {
                return Err(ConfigError::IdTwice(id.to_string()));
            }
        }
        for disk in self.devices.disks.iter().map(|d| &d.config) {
            // Opens, checks (a qcow2 image's header, tables and backing
            // chain) and closes the image: a bad one is bad input.
            virtio_devices::block::check_image(disk).map_err(ConfigError::Disk)?;
        }
        let mut tags = std::collections::HashSet::new();
        for fs in self.devices.fs.iter().map(|f| &f.config) {
            if !tags.insert(fs.tag.as_str()) {
                return Err(ConfigError::FsTagTwice(fs.tag.clone()));
            }
            if !fs.socket.exists() {
                return Err(ConfigError::FsSocket(fs.socket.clone(), fs.tag.clone()));
            }
        }
        if let Some(sock) = &self.api_socket {
            if std::os::unix::net::UnixStream::connect(sock).is_ok() {
                return Err(ConfigError::ApiSocketInUse(sock.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            kernel: PathBuf::from("/nonexistent"),
            initramfs: None,
            cmdline: DEFAULT_CMDLINE.into(),
            cpus: 1,
            max_cpus: 1,
            memory_mib: 256,
            hotplug_mib: 0,
            serial: SerialConfig::stdout(),
            api_socket: None,
            devices: DeviceConfig::default(),
            firmware: None,
        }
    }

    #[test]
    fn serial_parsing() {
        let ok = |output, socket: Option<&str>| Ok(SerialConfig { output, socket: socket.map(PathBuf::from) });
        assert_eq!("stdout".parse::<SerialConfig>(), ok(SerialSink::Stdout, None));
        assert_eq!("off".parse::<SerialConfig>(), ok(SerialSink::Off, None));
        assert_eq!("file=/tmp/x".parse::<SerialConfig>(), ok(SerialSink::File("/tmp/x".into()), None));
        assert_eq!("socket=/r/s".parse::<SerialConfig>(), ok(SerialSink::Off, Some("/r/s")));
        assert_eq!("file=/x,socket=/s".parse::<SerialConfig>(), ok(SerialSink::File("/x".into()), Some("/s")));
        assert_eq!("socket=/s,file=/x".parse::<SerialConfig>(), ok(SerialSink::File("/x".into()), Some("/s")));
        for bad in ["file=", "socket=", "tcp:1", "stdout,socket=/s", "file=/a,file=/b", "socket=/a,socket=/b", "off,"] {
            assert!(bad.parse::<SerialConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn impossible_sizes_are_refused_before_files_are_read() {
        assert!(matches!(VmConfig { cpus: 0, ..cfg() }.validate(), Err(ConfigError::Cpus(0))));
        assert!(matches!(VmConfig { cpus: 255, ..cfg() }.validate(), Err(ConfigError::Cpus(255))));
        assert!(matches!(VmConfig { memory_mib: 1, ..cfg() }.validate(), Err(ConfigError::MemoryTooSmall(1))));
        assert!(matches!(
            VmConfig { memory_mib: u64::MAX >> 21, ..cfg() }.validate(),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        assert!(matches!(
            VmConfig { hotplug_mib: u64::MAX >> 21, ..cfg() }.validate(),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        assert!(matches!(cfg().validate(), Err(ConfigError::Kernel(_))));
    }
}
