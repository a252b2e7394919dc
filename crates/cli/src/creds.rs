//! Registry credentials from Docker's client configuration, looked up the
//! way `docker` does: `credHelpers[host]`, else `credsStore` (both run
//! `docker-credential-<helper> get` with the server on stdin), else
//! `auths[host].auth` (base64 `user:password`). The file is
//! `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;

use crate::remote::{home, url_host};

/// The key Docker uses for Docker Hub.
pub const DOCKER_HUB: &str = "https://index.docker.io/v1/";

/// A user name and password (or token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl Credentials {
    /// What the API's `source.secret` carries: base64 of `user:password`.
    pub fn secret(&self) -> String {
        STANDARD.encode(format!("{}:{}", self.username, self.password))
    }
}

#[derive(Debug, Default, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

#[derive(Debug, Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// Docker's configuration file.
pub fn docker_config_path() -> PathBuf {
    match std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("config.json"),
        None => home().join(".docker").join("config.json"),
    }
}

/// Whether a registry host is Docker Hub.
pub fn is_docker_hub(host: &str) -> bool {
    matches!(host, "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com")
}

/// Credentials for `host` (`ghcr.io`, `127.0.0.1:5000`, `docker.io`) from
/// Docker's configuration, if any.
pub fn docker_lookup(host: &str) -> Option<Credentials> {
    lookup_in(&docker_config_path(), host)
}

/// [`docker_lookup`] with an explicit configuration file.
pub fn lookup_in(path: &Path, host: &str) -> Option<Credentials> {
    let text = std::fs::read_to_string(path).ok()?;
    let cfg: DockerConfig = match serde_json::from_str(&text) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Warning: ignoring {}: {e}", path.display());
            return None;
        }
    };
    let hub = is_docker_hub(host);
    let server = if hub { DOCKER_HUB } else { host };
    let helper = cfg
        .cred_helpers
        .iter()
        .find(|(k, _)| same_registry(k, host))
        .map(|(_, v)| v.clone())
        .or_else(|| cfg.creds_store.clone().filter(|s| !s.is_empty()));
    if let Some(helper) = helper {
        if let Some(c) = run_helper(&helper, server) {
            return Some(c);
        }
    }
    let auth = cfg.auths.iter().find(|(k, _)| same_registry(k, host)).map(|(_, v)| v)?;
    if let (Some(u), Some(p)) = (&auth.username, &auth.password) {
        return Some(Credentials { username: u.clone(), password: p.clone() });
    }
    let decoded = STANDARD.decode(auth.auth.as_deref()?.trim()).ok()?;
    let (u, p) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some(Credentials { username: u.to_string(), password: p.to_string() })
}

/// Whether a key of Docker's configuration (`https://index.docker.io/v1/`,
/// `ghcr.io`, `http://host:5000`) names the registry `host`.
fn same_registry(key: &str, host: &str) -> bool {
    let k = url_host(key);
    k == host || (is_docker_hub(k) && is_docker_hub(host))
}

/// Runs `docker-credential-<helper> get` with `server` on stdin.
fn run_helper(helper: &str, server: &str) -> Option<Credentials> {
    let program = format!("docker-credential-{helper}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        return None;
    }
    let a: HelperAnswer = serde_json::from_slice(&out.stdout).ok()?;
    (!a.username.is_empty() || !a.secret.is_empty()).then_some(Credentials { username: a.username, password: a.secret })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Serializes tests that change PATH.
    pub(crate) static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn auths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = STANDARD.encode("bob:s3cret:x");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},"127.0.0.1:5000":{{"auth":"{auth}"}},
                "http://reg.lan":{{"username":"u","password":"p"}}}}}}"#
            ),
        )
        .unwrap();
        let bob_creds = Credentials { username: "bob".into(), password: "s3cret:x".into() };
        let bob = Some(bob_creds.clone());
        assert_eq!(lookup_in(&path, "docker.io"), bob);
        assert_eq!(lookup_in(&path, "127.0.0.1:5000"), bob);
        assert_eq!(lookup_in(&path, "reg.lan"), Some(Credentials { username: "u".into(), password: "p".into() }));
        assert_eq!(lookup_in(&path, "ghcr.io"), None);
        assert_eq!(lookup_in(&dir.path().join("none.json"), "docker.io"), None);
        assert_eq!(bob_creds.secret(), STANDARD.encode("bob:s3cret:x"));
    }

    #[test]
    fn helpers() {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("docker-credential-test");
        // Answers only for ghcr.io and Docker Hub; logs what it was asked.
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nread server\necho \"$1 $server\" >> {}/asked\ncase \"$server\" in\n\
                 ghcr.io|https://index.docker.io/v1/) echo '{{\"ServerURL\":\"'$server'\",\"Username\":\"hu\",\"Secret\":\"hs\"}}';;\n\
                 *) echo 'credentials not found in native keychain'; exit 1;;\nesac\n",
                dir.path().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let old = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![dir.path().to_path_buf()];
        paths.extend(std::env::split_paths(&old));
        std::env::set_var("PATH", std::env::join_paths(paths).unwrap());
        let path = dir.path().join("config.json");
        let auth = STANDARD.encode("a:b");
        std::fs::write(
            &path,
            format!(r#"{{"credsStore":"test","credHelpers":{{"quay.io":"missing"}},"auths":{{"q.lan":{{"auth":"{auth}"}}}}}}"#),
        )
        .unwrap();
        let helper = Some(Credentials { username: "hu".into(), password: "hs".into() });
        assert_eq!(lookup_in(&path, "ghcr.io"), helper);
        assert_eq!(lookup_in(&path, "docker.io"), helper);
        // The store has nothing for q.lan: the auths entry is used.
        assert_eq!(lookup_in(&path, "q.lan"), Some(Credentials { username: "a".into(), password: "b".into() }));
        // A credHelpers entry whose program is missing: nothing.
        assert_eq!(lookup_in(&path, "quay.io"), None);
        std::env::set_var("PATH", old);
        let asked = std::fs::read_to_string(dir.path().join("asked")).unwrap();
        assert!(asked.contains("get ghcr.io") && asked.contains("get https://index.docker.io/v1/"), "{asked}");
    }
}
