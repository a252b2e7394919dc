//! The command-line grammar of devices and sizes (`key=value,...`), so
//! that clap can use `str::parse` for each option. The API's JSON bodies
//! (`skiff-vmm-client` types) convert to the same option types, so a
//! device is built the same way at boot and when hot-plugged.
//!
//! | option      | syntax                                                          |
//! |-------------|-----------------------------------------------------------------|
//! | `--cpus`    | `N` or `boot=N[,max=M]`                                         |
//! | `--memory`  | `MIB` or `size=MIB[,hotplug=MIB]`                               |
//! | `--disk`    | `path=P[,readonly=on\|off][,serial=S][,id=ID]`                  |
//! | `--net`     | `tap=NAME[,mac=MAC][,id=ID]` or `fd=N[,mac=MAC][,id=ID]`        |
//! | `--vsock`   | `cid=N,socket=PATH[,id=ID]`                                     |
//! | `--fs`      | `tag=T,socket=PATH[,queues=N][,queue_size=N][,id=ID]`           |
//! | `--console` | `file=PATH` or `socket=PATH`                                    |
//!
//! Device ids are 1–64 characters of `A-Z a-z 0-9 _ . -`; without `id=`
//! the VMM names a device after its kind (`disk0`, `net1`, ...).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use skiff_vmm_client::types::{DiskSpec, FsSpec, NetSpec, VsockSpec};
use virtio_devices::block::request::ID_BYTES;
use virtio_devices::block::BlockConfig;
use virtio_devices::console::ConsoleOutput;
use virtio_devices::fs::{FsConfig, MAX_TAG_LEN};
use virtio_devices::net::parse_mac;

/// Errors parsing an option.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    #[error("expected key=value, got {0:?}")]
    NotKeyValue(String),
    #[error("duplicate key {0:?}")]
    Duplicate(String),
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    #[error("missing {0}=")]
    Missing(&'static str),
    #[error("invalid value {value:?} for {key}")]
    InvalidValue { key: &'static str, value: String },
    #[error("give exactly one of {0}")]
    OneOf(&'static str),
}

fn invalid(key: &'static str, value: impl ToString) -> OptionError {
    OptionError::InvalidValue { key, value: value.to_string() }
}

struct Options(BTreeMap<String, String>);

impl Options {
    fn parse(s: &str, known: &[&str]) -> Result<Self, OptionError> {
        let mut map = BTreeMap::new();
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (k, v) = item.split_once('=').ok_or_else(|| OptionError::NotKeyValue(item.to_string()))?;
            if !known.contains(&k) {
                return Err(OptionError::UnknownKey(k.to_string()));
            }
            if map.insert(k.to_string(), v.to_string()).is_some() {
                return Err(OptionError::Duplicate(k.to_string()));
            }
        }
        Ok(Options(map))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn required(&self, key: &'static str) -> Result<&str, OptionError> {
        self.get(key).filter(|v| !v.is_empty()).ok_or(OptionError::Missing(key))
    }

    fn number<T: FromStr>(&self, key: &'static str) -> Result<Option<T>, OptionError> {
        self.get(key).map(|v| v.parse().map_err(|_| invalid(key, v))).transpose()
    }

    fn flag(&self, key: &'static str) -> Result<bool, OptionError> {
        match self.get(key) {
            None | Some("off") | Some("false") => Ok(false),
            Some("on") | Some("true") => Ok(true),
            Some(v) => Err(invalid(key, v)),
        }
    }

    fn id(&self) -> Result<Option<String>, OptionError> {
        self.get("id").map(|v| check_id(v).map(|()| v.to_string())).transpose()
    }
}

/// Checks a device id's length and characters.
pub fn check_id(id: &str) -> Result<(), OptionError> {
    let ok = (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid("id", id))
    }
}

/// `--cpus`: vCPUs at boot and the most the VM may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpusOption {
    pub boot: u8,
    pub max: u8,
}

impl FromStr for CpusOption {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, OptionError> {
        if let Ok(n) = s.parse::<u8>() {
            return Ok(Self { boot: n, max: n });
        }
        let o = Options::parse(s, &["boot", "max"])?;
        let boot: u8 = o.number("boot")?.ok_or(OptionError::Missing("boot"))?;
        let max = o.number("max")?.unwrap_or(boot);
        if max < boot {
            return Err(invalid("max", max));
        }
        Ok(Self { boot, max })
    }
}

/// Granularity of the memory hot-plug region in MiB: Linux onlines hot-plugged
/// memory in memory blocks of 128 MiB.
pub const HOTPLUG_ALIGN_MIB: u64 = 128;

/// `--memory`: boot memory and the size of the hot-plug region (0 for none),
/// in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryOption {
    pub size_mib: u64,
    pub hotplug_mib: u64,
}

impl FromStr for MemoryOption {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, OptionError> {
        if let Ok(n) = s.parse::<u64>() {
            return Ok(Self { size_mib: n, hotplug_mib: 0 });
        }
        let o = Options::parse(s, &["size", "hotplug"])?;
        let size_mib = o.number("size")?.ok_or(OptionError::Missing("size"))?;
        let hotplug_mib: u64 = o.number("hotplug")?.unwrap_or(0);
        if !hotplug_mib.is_multiple_of(HOTPLUG_ALIGN_MIB) || hotplug_mib > 1 << 30 {
            return Err(invalid("hotplug", hotplug_mib));
        }
        Ok(Self { size_mib, hotplug_mib })
    }
}

/// `--disk`.
#[derive(Debug, Clone)]
pub struct DiskOption {
    pub id: Option<String>,
    pub config: BlockConfig,
}

impl FromStr for DiskOption {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, OptionError> {
        let o = Options::parse(s, &["path", "format", "readonly", "serial", "id"])?;
        let format = match o.get("format") {
            None => None,
            Some(f) => Some(f.parse().map_err(|_| invalid("format", f))?),
        };
        let config = BlockConfig {
            path: PathBuf::from(o.required("path")?),
            format,
            readonly: o.flag("readonly")?,
            serial: o.get("serial").map(str::to_string),
        };
        Self::checked(o.id()?, config)
    }
}

impl DiskOption {
    fn checked(id: Option<String>, config: BlockConfig) -> Result<Self, OptionError> {
        if let Some(s) = config.serial.as_ref().filter(|s| s.len() > ID_BYTES) {
            return Err(invalid("serial", s));
        }
        Ok(Self { id, config })
    }
}

impl TryFrom<DiskSpec> for DiskOption {
    type Error = OptionError;
    fn try_from(d: DiskSpec) -> Result<Self, OptionError> {
        d.id.as_deref().map(check_id).transpose()?;
        let format = d.format.map(|f| f.parse().map_err(|_| invalid("format", f))).transpose()?;
        Self::checked(d.id, BlockConfig { path: d.path, format, readonly: d.readonly, serial: d.serial })
    }
}

/// Where a NIC's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// A tap by name, created if missing.
    Tap(String),
    /// An inherited tap file descriptor.
    Fd(i32),
}

/// `--net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOption {
    pub id: Option<String>,
    pub backend: NetBackend,
    pub mac: Option<[u8; 6]>,
}

fn tap_name(name: &str) -> Result<NetBackend, OptionError> {
    // IFNAMSIZ is 16 with the terminating NUL.
    if name.is_empty() || name.len() >= 16 || name.contains('/') {
        return Err(invalid("tap", name));
    }
    Ok(NetBackend::Tap(name.to_string()))
}

fn mac(m: Option<&str>) -> Result<Option<[u8; 6]>, OptionError> {
    m.map(|m| parse_mac(m).map_err(|_| invalid("mac", m))).transpose()
}

impl FromStr for NetOption {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, OptionError> {
        let o = Options::parse(s, &["tap", "fd", "mac", "id"])?;
        let backend = match (o.get("tap"), o.number::<i32>("fd")?) {
            (Some(name), None) => tap_name(name)?,
            (None, Some(fd)) if fd >= 0 => NetBackend::Fd(fd),
            (None, Some(fd)) => return Err(invalid("fd", fd)),
            _ => return Err(OptionError::OneOf("tap= or fd=")),
        };
        Ok(Self { id: o.id()?, backend, mac: mac(o.get("mac"))? })
    }
}

impl TryFrom<NetSpec> for NetOption {
    type Error = OptionError;
    fn try_from(n: NetSpec) -> Result<Self, OptionError> {
        n.id.as_deref().map(check_id).transpose()?;
        Ok(Self { id: n.id, backend: tap_name(&n.tap)?, mac: mac(n.mac.as_deref())? })
    }
}

/// `--vsock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockOption {
    pub id: Option<String>,
    pub cid: u64,
    pub socket: PathBuf,
}

fn check_cid(cid: u64) -> Result<u64, OptionError> {
    if (3..=u64::from(u32::MAX)).contains(&cid) {
        Ok(cid)
    } else {
        Err(invalid("cid", cid))
    }
}

impl FromStr for VsockOption {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, OptionError> {
        let o = Options::parse(s, &["cid", "socket", "id"])?;
        let cid = check_cid(o.number("cid")?.ok_or(OptionError::Missing("cid"))?)?;
        Ok(Self { id: o.id()?, cid, socket: PathBuf::from(o.required("socket")?) })
    }
}

impl TryFrom<VsockSpec> for VsockOption {
    type Error = OptionError;
    fn try_from(v: VsockSpec) -> Result<Self, OptionError> {
        v.id.as_deref().map(check_id).transpose()?;
        Ok(Self { id: v.id, cid: check_cid(u64::from(v.cid))?, socket: v.socket })
    }
}

/// `--fs`.
#[derive(Debug, Clone)]
pub struct FsOption {
    pub id: Option<String>,
    pub config: FsConfig,
}

fn fs_config(tag: &str, socket: PathBuf) -> Result<FsConfig, OptionError> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return Err(invalid("tag", tag));
    }
    Ok(FsConfig::new(tag, socket))
}

impl FromStr for FsOption {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, OptionError> {
        let o = Options::parse(s, &["tag", "socket", "queues", "queue_size", "id"])?;
        let mut config = fs_config(o.required("tag")?, PathBuf::from(o.required("socket")?))?;
        if let Some(q) = o.number::<u16>("queues")? {
            if q == 0 || q > 64 {
                return Err(invalid("queues", q));
            }
            config.num_request_queues = q;
        }
        if let Some(n) = o.number::<u16>("queue_size")? {
            if !n.is_power_of_two() {
                return Err(invalid("queue_size", n));
            }
            config.queue_size = n;
        }
        Ok(Self { id: o.id()?, config })
    }
}

impl TryFrom<FsSpec> for FsOption {
    type Error = OptionError;
    fn try_from(f: FsSpec) -> Result<Self, OptionError> {
        f.id.as_deref().map(check_id).transpose()?;
        Ok(Self { id: f.id, config: fs_config(&f.tag, f.socket)? })
    }
}

/// `--console`.
#[derive(Debug, Clone)]
pub struct ConsoleOption(pub ConsoleOutput);

impl FromStr for ConsoleOption {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, OptionError> {
        let o = Options::parse(s, &["file", "socket"])?;
        match (o.get("file"), o.get("socket")) {
            (Some(f), None) if !f.is_empty() => Ok(Self(ConsoleOutput::File(PathBuf::from(f)))),
            (None, Some(p)) if !p.is_empty() => Ok(Self(ConsoleOutput::Socket(PathBuf::from(p)))),
            _ => Err(OptionError::OneOf("file= or socket=")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory() {
        let m = |size_mib, hotplug_mib| Ok(MemoryOption { size_mib, hotplug_mib });
        assert_eq!("512".parse::<MemoryOption>(), m(512, 0));
        assert_eq!("size=512".parse::<MemoryOption>(), m(512, 0));
        assert_eq!("size=512,hotplug=4096".parse::<MemoryOption>(), m(512, 4096));
        assert_eq!("hotplug=256,size=1024".parse::<MemoryOption>(), m(1024, 256));
        assert_eq!("hotplug=256".parse::<MemoryOption>(), Err(OptionError::Missing("size")));
        assert_eq!("size=512,hotplug=100".parse::<MemoryOption>(), Err(invalid("hotplug", 100)));
        assert!("size=512,hotplug=-128".parse::<MemoryOption>().is_err());
        assert!("size=512,hotplug=137438953472".parse::<MemoryOption>().is_err());
        assert!("size=512,max=4096".parse::<MemoryOption>().is_err());
        assert!("512M".parse::<MemoryOption>().is_err());
    }

    #[test]
    fn cpus() {
        assert_eq!("4".parse::<CpusOption>(), Ok(CpusOption { boot: 4, max: 4 }));
        assert_eq!("boot=2,max=8".parse::<CpusOption>(), Ok(CpusOption { boot: 2, max: 8 }));
        assert_eq!("boot=2".parse::<CpusOption>(), Ok(CpusOption { boot: 2, max: 2 }));
        assert!("boot=4,max=2".parse::<CpusOption>().is_err());
        assert!("max=2".parse::<CpusOption>().is_err());
        assert!("boot=300".parse::<CpusOption>().is_err());
    }

    #[test]
    fn disks() {
        let d: DiskOption = "path=/img/a.raw,readonly=on,serial=disk0,id=root".parse().unwrap();
        assert_eq!(d.config.path, PathBuf::from("/img/a.raw"));
        assert!(d.config.readonly);
        assert_eq!((d.config.serial.as_deref(), d.id.as_deref()), (Some("disk0"), Some("root")));
        let d: DiskOption = "path=b.raw".parse().unwrap();
        assert!(!d.config.readonly && d.config.serial.is_none() && d.id.is_none());
        assert_eq!(d.config.format, None);
        let d: DiskOption = "path=c.qcow2,format=qcow2".parse().unwrap();
        assert_eq!(d.config.format, Some(virtio_devices::block::Format::Qcow2));
        let d: DiskOption = "path=c.img,format=raw".parse().unwrap();
        assert_eq!(d.config.format, Some(virtio_devices::block::Format::Raw));
        let cases: &[(&str, OptionError)] = &[
            ("readonly=on", OptionError::Missing("path")),
            ("path=", OptionError::Missing("path")),
            ("path=a,readonly=maybe", invalid("readonly", "maybe")),
            ("path=a,format=vmdk", invalid("format", "vmdk")),
            ("path=a,path=b", OptionError::Duplicate("path".into())),
            ("path=a,cache=none", OptionError::UnknownKey("cache".into())),
            ("path", OptionError::NotKeyValue("path".into())),
            ("path=a,serial=123456789012345678901", invalid("serial", "123456789012345678901")),
            ("path=a,id=no/slash", invalid("id", "no/slash")),
        ];
        for (s, e) in cases {
            assert_eq!(s.parse::<DiskOption>().unwrap_err(), *e, "{s}");
        }
        let spec = DiskSpec { id: Some("x y".into()), path: "/a".into(), readonly: false, serial: None, format: None };
        assert_eq!(DiskOption::try_from(spec).unwrap_err(), invalid("id", "x y"));
        let api = |format: &str| DiskSpec {
            id: None,
            path: "/a".into(),
            readonly: false,
            serial: None,
            format: Some(format.into()),
        };
        let d = DiskOption::try_from(api("raw")).unwrap();
        assert_eq!(d.config.format, Some(virtio_devices::block::Format::Raw));
        assert_eq!(DiskOption::try_from(api("vmdk")).unwrap_err(), invalid("format", "vmdk"));
    }

    #[test]
    fn nics() {
        let n: NetOption = "tap=skiff0,mac=52:54:00:00:00:01".parse().unwrap();
        assert_eq!(n.backend, NetBackend::Tap("skiff0".into()));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0, 0, 1]));
        let n: NetOption = "fd=3,id=lan".parse().unwrap();
        assert_eq!((n.backend, n.mac, n.id.as_deref()), (NetBackend::Fd(3), None, Some("lan")));
        assert_eq!("tap=a,fd=3".parse::<NetOption>().unwrap_err(), OptionError::OneOf("tap= or fd="));
        assert_eq!("mac=52:54:00:00:00:01".parse::<NetOption>().unwrap_err(), OptionError::OneOf("tap= or fd="));
        assert!("tap=a-very-long-tap-name".parse::<NetOption>().is_err());
        assert!("fd=-1".parse::<NetOption>().is_err());
        assert!("tap=t,mac=52:54".parse::<NetOption>().is_err());
        let spec = NetSpec { id: None, tap: "../x".into(), mac: None };
        assert!(NetOption::try_from(spec).is_err());
    }

    #[test]
    fn vsock_fs_console() {
        let v: VsockOption = "cid=3,socket=/run/v.sock".parse().unwrap();
        assert_eq!((v.cid, v.socket), (3, PathBuf::from("/run/v.sock")));
        assert!("cid=2,socket=x".parse::<VsockOption>().is_err());
        assert!("cid=x,socket=x".parse::<VsockOption>().is_err());
        assert_eq!("socket=x".parse::<VsockOption>().unwrap_err(), OptionError::Missing("cid"));
        assert!(VsockOption::try_from(VsockSpec { id: None, cid: 1, socket: "s".into() }).is_err());

        let f: FsOption = "tag=rootfs,socket=/run/fs.sock,queues=2,queue_size=512".parse().unwrap();
        assert_eq!((f.config.tag.as_str(), f.config.num_request_queues, f.config.queue_size), ("rootfs", 2, 512));
        let f: FsOption = "tag=t,socket=s".parse().unwrap();
        assert_eq!((f.config.num_request_queues, f.config.queue_size), (1, virtio_devices::fs::DEFAULT_QUEUE_SIZE));
        assert!("tag=t,socket=s,queue_size=1000".parse::<FsOption>().is_err());
        assert!("tag=t,socket=s,queues=0".parse::<FsOption>().is_err());
        assert!(format!("tag={},socket=s", "x".repeat(37)).parse::<FsOption>().is_err());
        assert!(FsOption::try_from(FsSpec { id: None, tag: String::new(), socket: "s".into() }).is_err());

        assert!(matches!("file=/tmp/c.log".parse::<ConsoleOption>().unwrap().0, ConsoleOutput::File(_)));
        assert!(matches!("socket=/tmp/c.sock".parse::<ConsoleOption>().unwrap().0, ConsoleOutput::Socket(_)));
        assert!("file=a,socket=b".parse::<ConsoleOption>().is_err());
        assert!("".parse::<ConsoleOption>().is_err());
    }
}
