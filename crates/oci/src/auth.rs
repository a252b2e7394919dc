//! Registry credentials from Docker's `config.json`: inline `auths`
//! entries, per-registry `credHelpers` and the default `credsStore`
//! (`docker-credential-<name> get`), as `docker` and `skopeo` read them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde::Deserialize;

/// The server name Docker Hub credentials are stored under.
pub const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// Credentials that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The config file is unreadable.
    #[error("reading {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The config file is not valid JSON of the expected shape.
    #[error("parsing {0}")]
    Parse(PathBuf, #[source] serde_json::Error),
    /// An `auth` field that is not base64 of `user:password`.
    #[error("{path}: malformed auth entry for {registry}")]
    Entry {
        /// The config file.
        path: PathBuf,
        /// The registry key.
        registry: String,
    },
    /// The credential helper could not run or failed.
    #[error("credential helper docker-credential-{helper} for {registry}: {reason}")]
    Helper {
        /// The helper name.
        helper: String,
        /// The registry.
        registry: String,
        /// What went wrong.
        reason: String,
    },
}

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// user and password (or token as password).
    Basic(String, String),
    /// A bearer token.
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Basic(u, _) => write!(f, "Basic({u}, ***)"),
            Self::Bearer(_) => write!(f, "Bearer(***)"),
        }
    }
}

impl Credentials {
    /// The form `oci-client` takes.
    pub fn to_client(&self) -> oci_client::secrets::RegistryAuth {
        match self {
            Self::Basic(u, p) => oci_client::secrets::RegistryAuth::Basic(u.clone(), p.clone()),
            Self::Bearer(t) => oci_client::secrets::RegistryAuth::Bearer(t.clone()),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn default_config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Reduces a config key (`https://host:5000/v1/`) to `host:5000`.
fn normalize_key(k: &str) -> String {
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let k = k.split('/').next().unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

/// Credentials for `registry` (as in a [`crate::Reference`]) from the
/// config at `path` (or the default location); `None` when there are none.
pub fn lookup(registry: &str, path: Option<&Path>) -> Result<Option<Credentials>, AuthError> {
    let Some(path) = path.map(Path::to_path_buf).or_else(default_config_path) else {
        return Ok(None);
    };
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AuthError::Read(path, e)),
    };
    let cfg: DockerConfig =
        serde_json::from_slice(&text).map_err(|e| AuthError::Parse(path.clone(), e))?;
    let want = normalize_key(registry);
    let server = if want == "docker.io" {
        DOCKER_HUB_KEY.to_string()
    } else {
        registry.to_string()
    };
    if let Some((_, helper)) = cfg
        .cred_helpers
        .iter()
        .find(|(k, _)| normalize_key(k) == want)
    {
        return run_helper(helper, &server);
    }
    if let Some((key, e)) = cfg.auths.iter().find(|(k, _)| normalize_key(k) == want) {
        if let Some(t) = e.registrytoken.as_ref().filter(|t| !t.is_empty()) {
            return Ok(Some(Credentials::Bearer(t.clone())));
        }
        if let (Some(u), Some(p)) = (&e.username, &e.password) {
            return Ok(Some(Credentials::Basic(u.clone(), p.clone())));
        }
        if let Some(a) = e.auth.as_ref().filter(|a| !a.is_empty()) {
            let bad = || AuthError::Entry {
                path: path.clone(),
                registry: key.clone(),
            };
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .map_err(|_| bad())?;
            let s = String::from_utf8(raw).map_err(|_| bad())?;
            let (u, p) = s.split_once(':').ok_or_else(bad)?;
            return Ok(Some(Credentials::Basic(u.to_string(), p.to_string())));
        }
        if let Some(t) = e.identitytoken.as_ref().filter(|t| !t.is_empty()) {
            // An OAuth refresh token; registries that accept it take it
            // as the password of the user `<token>`.
            return Ok(Some(Credentials::Basic("<token>".into(), t.clone())));
        }
    }
    match &cfg.creds_store {
        Some(store) if !store.is_empty() => run_helper(store, &server),
        _ => Ok(None),
    }
}

/// Runs `docker-credential-<helper> get` with the server on stdin.
fn run_helper(helper: &str, server: &str) -> Result<Option<Credentials>, AuthError> {
    let fail = |reason: String| AuthError::Helper {
        helper: helper.to_string(),
        registry: server.to_string(),
        reason,
    };
    let mut child = Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(server.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Docker treats "not found" as no credentials.
        if stdout.contains("credentials not found") {
            return Ok(None);
        }
        return Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Reply {
        username: String,
        secret: String,
    }
    let r: Reply = serde_json::from_str(&stdout).map_err(|e| fail(format!("bad reply: {e}")))?;
    Ok(Some(Credentials::Basic(r.username, r.secret)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json_auths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        std::fs::write(
            &p,
            format!(
                r#"{{"auths":{{"{DOCKER_HUB_KEY}":{{"auth":"{b64}"}},"http://127.0.0.1:5000/v2/":{{"username":"bob","password":"pw"}},"tok.io":{{"registrytoken":"T"}},"bad.io":{{"auth":"!!"}}}}}}"#
            ),
        )
        .unwrap();
        let l = |r| lookup(r, Some(&p));
        assert_eq!(
            l("docker.io").unwrap(),
            Some(Credentials::Basic("alice".into(), "s3cr:et".into()))
        );
        assert_eq!(
            l("127.0.0.1:5000").unwrap(),
            Some(Credentials::Basic("bob".into(), "pw".into()))
        );
        assert_eq!(l("tok.io").unwrap(), Some(Credentials::Bearer("T".into())));
        assert_eq!(l("ghcr.io").unwrap(), None);
        assert!(matches!(l("bad.io"), Err(AuthError::Entry { .. })));
        assert_eq!(
            lookup("x", Some(&dir.path().join("missing.json"))).unwrap(),
            None
        );
        assert!(format!("{:?}", l("docker.io").unwrap()).contains("***"));
    }

    #[test]
    fn missing_helper_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, r#"{"credHelpers":{"ghcr.io":"skiff-test-absent"}}"#).unwrap();
        let e = lookup("ghcr.io", Some(&p)).unwrap_err().to_string();
        assert!(
            e.contains("docker-credential-skiff-test-absent") && e.contains("ghcr.io"),
            "{e}"
        );
    }
}
