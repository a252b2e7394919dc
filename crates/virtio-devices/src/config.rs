//! Parsing of the device options of the command line (`key=value,...`),
//! so that the VMM's argument parser can use `str::parse` for each:
//!
//! | option      | syntax                                                        |
//! |-------------|---------------------------------------------------------------|
//! | `--disk`    | `path=P[,readonly=on\|off][,serial=S]`                        |
//! | `--net`     | `tap=NAME[,mac=MAC]` or `fd=N[,mac=MAC]`                      |
//! | `--vsock`   | `cid=N,socket=PATH`                                           |
//! | `--fs`      | `tag=T,socket=PATH[,queues=N][,queue_size=N]`                 |
//! | `--console` | `file=PATH` or `socket=PATH`                                  |

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use crate::block::BlockConfig;
use crate::console::ConsoleOutput;
use crate::fs::FsConfig;
use crate::net::parse_mac;

/// Errors parsing a device option.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// An item is not `key=value`.
    #[error("expected key=value, got {0:?}")]
    NotKeyValue(String),
    /// A key appears twice.
    #[error("duplicate key {0:?}")]
    Duplicate(String),
    /// A key this option does not know.
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    /// A required key is missing.
    #[error("missing {0}=")]
    Missing(&'static str),
    /// A value does not parse.
    #[error("invalid value {value:?} for {key}")]
    InvalidValue {
        /// The key.
        key: &'static str,
        /// The value.
        value: String,
    },
    /// Keys that exclude each other.
    #[error("give exactly one of {0}")]
    OneOf(&'static str),
}

struct Options(BTreeMap<String, String>);

impl Options {
    fn parse(s: &str, known: &[&str]) -> Result<Self, ConfigError> {
        let mut map = BTreeMap::new();
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::NotKeyValue(item.to_string()))?;
            if !known.contains(&k) {
                return Err(ConfigError::UnknownKey(k.to_string()));
            }
            if map.insert(k.to_string(), v.to_string()).is_some() {
                return Err(ConfigError::Duplicate(k.to_string()));
            }
        }
        Ok(Options(map))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn required(&self, key: &'static str) -> Result<&str, ConfigError> {
        self.get(key)
            .filter(|v| !v.is_empty())
            .ok_or(ConfigError::Missing(key))
    }

    fn number<T: FromStr>(&self, key: &'static str) -> Result<Option<T>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.parse().map_err(|_| ConfigError::InvalidValue {
                    key,
                    value: v.to_string(),
                })
            })
            .transpose()
    }

    fn flag(&self, key: &'static str) -> Result<bool, ConfigError> {
        match self.get(key) {
            None | Some("off") | Some("false") => Ok(false),
            Some("on") | Some("true") => Ok(true),
            Some(v) => Err(ConfigError::InvalidValue {
                key,
                value: v.to_string(),
            }),
        }
    }
}

impl FromStr for BlockConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let o = Options::parse(s, &["path", "readonly", "serial"])?;
        let serial = o.get("serial").map(str::to_string);
        if serial
            .as_ref()
            .is_some_and(|s| s.len() > crate::block::request::ID_BYTES)
        {
            return Err(ConfigError::InvalidValue {
                key: "serial",
                value: serial.unwrap_or_default(),
            });
        }
        Ok(BlockConfig {
            path: PathBuf::from(o.required("path")?),
            readonly: o.flag("readonly")?,
            serial,
        })
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

/// A `--net` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The backend.
    pub backend: NetBackend,
    /// The MAC address, if given.
    pub mac: Option<[u8; 6]>,
}

impl FromStr for NetConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let o = Options::parse(s, &["tap", "fd", "mac"])?;
        let backend = match (o.get("tap"), o.number::<i32>("fd")?) {
            (Some(name), None) if !name.is_empty() && name.len() < 16 => {
                NetBackend::Tap(name.to_string())
            }
            (Some(name), None) => {
                return Err(ConfigError::InvalidValue {
                    key: "tap",
                    value: name.to_string(),
                })
            }
            (None, Some(fd)) if fd >= 0 => NetBackend::Fd(fd),
            (None, Some(fd)) => {
                return Err(ConfigError::InvalidValue {
                    key: "fd",
                    value: fd.to_string(),
                })
            }
            _ => return Err(ConfigError::OneOf("tap= or fd=")),
        };
        let mac = o
            .get("mac")
            .map(|m| {
                parse_mac(m).map_err(|_| ConfigError::InvalidValue {
                    key: "mac",
                    value: m.to_string(),
                })
            })
            .transpose()?;
        Ok(NetConfig { backend, mac })
    }
}

/// A `--vsock` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// Guest context id (3 or more).
    pub cid: u64,
    /// Host-side Unix socket.
    pub socket: PathBuf,
}

impl FromStr for VsockConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let o = Options::parse(s, &["cid", "socket"])?;
        let cid: u64 = o.number("cid")?.ok_or(ConfigError::Missing("cid"))?;
        if !(3..=u64::from(u32::MAX)).contains(&cid) {
            return Err(ConfigError::InvalidValue {
                key: "cid",
                value: cid.to_string(),
            });
        }
        Ok(VsockConfig {
            cid,
            socket: PathBuf::from(o.required("socket")?),
        })
    }
}

impl FromStr for FsConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let o = Options::parse(s, &["tag", "socket", "queues", "queue_size"])?;
        let tag = o.required("tag")?;
        if tag.len() > crate::fs::MAX_TAG_LEN {
            return Err(ConfigError::InvalidValue {
                key: "tag",
                value: tag.to_string(),
            });
        }
        let mut cfg = FsConfig::new(tag, PathBuf::from(o.required("socket")?));
        if let Some(q) = o.number::<u16>("queues")? {
            if q == 0 || q > 64 {
                return Err(ConfigError::InvalidValue {
                    key: "queues",
                    value: q.to_string(),
                });
            }
            cfg.num_request_queues = q;
        }
        if let Some(n) = o.number::<u16>("queue_size")? {
            if !n.is_power_of_two() {
                return Err(ConfigError::InvalidValue {
                    key: "queue_size",
                    value: n.to_string(),
                });
            }
            cfg.queue_size = n;
        }
        Ok(cfg)
    }
}

impl FromStr for ConsoleOutput {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let o = Options::parse(s, &["file", "socket"])?;
        match (o.get("file"), o.get("socket")) {
            (Some(f), None) if !f.is_empty() => Ok(ConsoleOutput::File(PathBuf::from(f))),
            (None, Some(p)) if !p.is_empty() => Ok(ConsoleOutput::Socket(PathBuf::from(p))),
            _ => Err(ConfigError::OneOf("file= or socket=")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks() {
        let d: BlockConfig = "path=/img/a.raw,readonly=on,serial=disk0".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/img/a.raw"));
        assert!(d.readonly);
        assert_eq!(d.serial.as_deref(), Some("disk0"));
        let d: BlockConfig = "path=b.raw".parse().unwrap();
        assert!(!d.readonly && d.serial.is_none());
        let cases: &[(&str, ConfigError)] = &[
            ("readonly=on", ConfigError::Missing("path")),
            ("path=", ConfigError::Missing("path")),
            (
                "path=a,readonly=maybe",
                ConfigError::InvalidValue {
                    key: "readonly",
                    value: "maybe".into(),
                },
            ),
            ("path=a,path=b", ConfigError::Duplicate("path".into())),
            ("path=a,cache=none", ConfigError::UnknownKey("cache".into())),
            ("path", ConfigError::NotKeyValue("path".into())),
            (
                "path=a,serial=123456789012345678901",
                ConfigError::InvalidValue {
                    key: "serial",
                    value: "123456789012345678901".into(),
                },
            ),
        ];
        for (s, e) in cases {
            assert_eq!(s.parse::<BlockConfig>().unwrap_err(), *e, "{s}");
        }
    }

    #[test]
    fn nics() {
        let n: NetConfig = "tap=skiff0,mac=52:54:00:00:00:01".parse().unwrap();
        assert_eq!(n.backend, NetBackend::Tap("skiff0".into()));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0, 0, 1]));
        let n: NetConfig = "fd=3".parse().unwrap();
        assert_eq!((n.backend, n.mac), (NetBackend::Fd(3), None));
        assert_eq!(
            "tap=a,fd=3".parse::<NetConfig>().unwrap_err(),
            ConfigError::OneOf("tap= or fd=")
        );
        assert_eq!(
            "mac=52:54:00:00:00:01".parse::<NetConfig>().unwrap_err(),
            ConfigError::OneOf("tap= or fd=")
        );
        assert!("tap=a-very-long-tap-name".parse::<NetConfig>().is_err());
        assert!("fd=-1".parse::<NetConfig>().is_err());
        assert!("tap=t,mac=52:54".parse::<NetConfig>().is_err());
    }

    #[test]
    fn vsock_fs_console() {
        let v: VsockConfig = "cid=3,socket=/run/v.sock".parse().unwrap();
        assert_eq!((v.cid, v.socket), (3, PathBuf::from("/run/v.sock")));
        assert!("cid=2,socket=x".parse::<VsockConfig>().is_err());
        assert!("cid=x,socket=x".parse::<VsockConfig>().is_err());
        assert_eq!(
            "socket=x".parse::<VsockConfig>().unwrap_err(),
            ConfigError::Missing("cid")
        );

        let f: FsConfig = "tag=rootfs,socket=/run/fs.sock,queues=2,queue_size=512"
            .parse()
            .unwrap();
        assert_eq!(
            (f.tag.as_str(), f.num_request_queues, f.queue_size),
            ("rootfs", 2, 512)
        );
        let f: FsConfig = "tag=t,socket=s".parse().unwrap();
        assert_eq!(
            (f.num_request_queues, f.queue_size),
            (1, crate::fs::DEFAULT_QUEUE_SIZE)
        );
        assert!("tag=t,socket=s,queue_size=1000"
            .parse::<FsConfig>()
            .is_err());
        assert!("tag=t,socket=s,queues=0".parse::<FsConfig>().is_err());
        assert!(format!("tag={},socket=s", "x".repeat(37))
            .parse::<FsConfig>()
            .is_err());

        assert!(matches!(
            "file=/tmp/c.log".parse::<ConsoleOutput>().unwrap(),
            ConsoleOutput::File(_)
        ));
        assert!(matches!(
            "socket=/tmp/c.sock".parse::<ConsoleOutput>().unwrap(),
            ConsoleOutput::Socket(_)
        ));
        assert!("file=a,socket=b".parse::<ConsoleOutput>().is_err());
        assert!("".parse::<ConsoleOutput>().is_err());
    }
}
