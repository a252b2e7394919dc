//! The client's configuration: image remotes (OCI registries) with their
//! credentials and the default remote, in
//! `$XDG_CONFIG_HOME/skiff/config.yml` (else `~/.config/skiff/config.yml`),
//! mode 0600.
//!
//! ```yaml
//! default-remote: local
//! remotes:
//!   myreg:
//!     addr: https://registry.example.com
//!     protocol: oci
//!     username: me
//!     password: secret
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// The pseudo-remote of the daemon itself: bare image names are resolved by skiffd.
pub const LOCAL: &str = "local";

/// One image remote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    /// Its URL (`https://registry.example.com`, `http://127.0.0.1:5000`).
    pub addr: String,
    /// `oci`.
    pub protocol: String,
    /// User name for the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password or token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl Remote {
    /// The registry's host (and port) from its URL.
    pub fn host(&self) -> &str {
        url_host(&self.addr)
    }
}

fn default_remote() -> String {
    LOCAL.to_string()
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// The remote bare image names come from (`local`: skiffd decides).
    #[serde(rename = "default-remote", default = "default_remote")]
    pub default_remote: String,
    /// Remotes by name.
    #[serde(default)]
    pub remotes: BTreeMap<String, Remote>,
}

impl Default for Config {
    fn default() -> Self {
        Config { default_remote: default_remote(), remotes: BTreeMap::new() }
    }
}

impl Config {
    /// Where the file is.
    pub fn path() -> PathBuf {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| home().join(".config"));
        base.join("skiff").join("config.yml")
    }

    /// Reads the file (an absent file is an empty configuration).
    pub fn load_from(path: &Path) -> anyhow::Result<Config> {
        match std::fs::read_to_string(path) {
            Ok(text) if text.trim().is_empty() => Ok(Config::default()),
            Ok(text) => serde_yaml::from_str(&text).with_context(|| format!("Failed to parse {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(e).with_context(|| format!("Failed to read {}", path.display())),
        }
    }

    /// Reads the default file.
    pub fn load() -> anyhow::Result<Config> {
        Config::load_from(&Config::path())
    }

    /// Writes the file with mode 0600 (it may hold passwords), atomically.
    pub fn save_to(&self, path: &Path) -> anyhow::Result<()> {
        let dir = path.parent().context("the configuration path has no directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("Failed to create {}", dir.display()))?;
        let text = serde_yaml::to_string(self)?;
        let tmp = path.with_extension("yml.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("Failed to write {}", tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("Failed to write {}", path.display()))?;
        Ok(())
    }

    /// Writes the default file.
    pub fn save(&self) -> anyhow::Result<()> {
        self.save_to(&Config::path())
    }

    /// Adds a remote; `url` without a scheme means https.
    pub fn add(&mut self, name: &str, url: &str, protocol: &str) -> anyhow::Result<&mut Remote> {
        if name == LOCAL || self.remotes.contains_key(name) {
            bail!("Remote {name} exists already");
        }
        if name.is_empty() || name.contains([':', '/']) {
            bail!("Invalid remote name \"{name}\" (no ':' or '/')");
        }
        if protocol != "oci" {
            bail!("Unsupported protocol \"{protocol}\" (only \"oci\")");
        }
        let remote = Remote { addr: normalize_url(url)?, protocol: protocol.into(), username: None, password: None };
        Ok(self.remotes.entry(name.to_string()).or_insert(remote))
    }
}

/// `registry.example.com` → `https://registry.example.com`; an explicit
/// `http://` stays (plain HTTP); the trailing `/` goes.
pub fn normalize_url(url: &str) -> anyhow::Result<String> {
    let url = url.trim().trim_end_matches('/');
    let full = if url.starts_with("https://") || url.starts_with("http://") {
        url.to_string()
    } else if url.contains("://") {
        bail!("Unsupported URL scheme in \"{url}\" (https:// or http://)");
    } else {
        format!("https://{url}")
    };
    if url_host(&full).is_empty() {
        bail!("Invalid URL \"{url}\"");
    }
    Ok(full)
}

/// The host (and port) of a URL or a bare `host/path`.
pub fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or("")
}

/// The home directory.
pub fn home() -> PathBuf {
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn round_trip_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("skiff/config.yml");
        assert_eq!(Config::load_from(&path).unwrap(), Config::default());
        let mut c = Config::default();
        let r = c.add("myreg", "registry.example.com/", "oci").unwrap();
        r.username = Some("me".into());
        r.password = Some("pw".into());
        c.add("lan", "http://127.0.0.1:5000", "oci").unwrap();
        c.default_remote = "lan".into();
        c.save_to(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let back = Config::load_from(&path).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.remotes["myreg"].addr, "https://registry.example.com");
        assert_eq!(back.remotes["lan"].host(), "127.0.0.1:5000");
        assert!(c.add("lan", "x", "oci").is_err());
        assert!(c.add("local", "x", "oci").is_err());
        assert!(c.add("z", "ftp://x", "oci").is_err());
        assert!(c.add("y", "x", "simplestreams").is_err());
    }
}
