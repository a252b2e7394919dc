//! What `skiff launch IMAGE` asks skiffd for: the `source` of
//! `POST /1.0/instances`.
//!
//! - `REMOTE:path/name:tag` (a remote added with `--protocol oci`) →
//!   `{type: image, protocol: oci, server: <remote URL>, alias: "path/name:tag"}`
//! - a full OCI reference, whose first component has a `.` or `:` or is
//!   `localhost` (`docker.io/library/nginx:1.27`, `ghcr.io/x/y`,
//!   `127.0.0.1:5000/x:t`) → `{type: image, protocol: oci, alias: <reference>}`
//! - anything else (`busybox`, `nginx:1.27`) → `{type: image, alias: NAME}`:
//!   skiffd tries its local aliases first, then Docker Hub like docker does;
//!   when the default remote is not `local`, the name goes to that remote.
//!
//! Credentials (`source.secret`, base64 `user:password`) come from the
//! remote's stored ones, else from Docker's configuration for that registry.

use anyhow::bail;
use skiff_api::InstanceSource;

use crate::creds::Credentials;
use crate::remote::{Config, Remote, LOCAL};

/// An image name, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// On a configured remote.
    Remote {
        /// The remote.
        remote: Remote,
        /// The repository and tag on it.
        alias: String,
    },
    /// A full OCI reference.
    Oci {
        /// The reference.
        reference: String,
        /// Its registry host.
        host: String,
    },
    /// A name skiffd resolves.
    Name(String),
}

/// Whether the first component of `s` names a registry.
fn is_registry(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost"
}

/// Classifies `image`.
pub fn parse(image: &str, cfg: &Config) -> anyhow::Result<ImageRef> {
    if image.is_empty() {
        bail!("No image given");
    }
    if let Some((prefix, rest)) = image.split_once(':') {
        if let Some(remote) = cfg.remotes.get(prefix) {
            if rest.is_empty() {
                bail!("No image given after the remote \"{prefix}:\"");
            }
            return Ok(ImageRef::Remote { remote: remote.clone(), alias: rest.to_string() });
        }
        if prefix == LOCAL && !rest.is_empty() {
            return Ok(ImageRef::Name(rest.to_string()));
        }
    }
    if let Some((first, _)) = image.split_once('/') {
        if is_registry(first) {
            return Ok(ImageRef::Oci { reference: image.to_string(), host: first.to_string() });
        }
    }
    if cfg.default_remote != LOCAL {
        let Some(remote) = cfg.remotes.get(&cfg.default_remote) else {
            bail!("The default remote \"{}\" does not exist (skiff remote switch local)", cfg.default_remote);
        };
        return Ok(ImageRef::Remote { remote: remote.clone(), alias: image.to_string() });
    }
    Ok(ImageRef::Name(image.to_string()))
}

/// The `source` for `image`; `lookup` finds credentials for a registry host.
pub fn source(
    image: &str,
    cfg: &Config,
    lookup: impl Fn(&str) -> Option<Credentials>,
) -> anyhow::Result<InstanceSource> {
    let mut src = InstanceSource { kind: "image".into(), ..Default::default() };
    let creds = match parse(image, cfg)? {
        ImageRef::Remote { remote, alias } => {
            src.protocol = Some("oci".into());
            src.server = Some(remote.addr.clone());
            src.alias = Some(alias);
            match (&remote.username, &remote.password) {
                (Some(u), Some(p)) => Some(Credentials { username: u.clone(), password: p.clone() }),
                _ => lookup(remote.host()),
            }
        }
        ImageRef::Oci { reference, host } => {
            src.protocol = Some("oci".into());
            src.alias = Some(reference);
            lookup(&host)
        }
        ImageRef::Name(name) => {
            src.alias = Some(name);
            lookup("docker.io")
        }
    };
    src.secret = creds.map(|c| c.secret());
    Ok(src)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        let mut c = Config::default();
        c.add("lan", "http://127.0.0.1:5000", "oci").unwrap();
        let r = c.add("corp", "registry.corp.example", "oci").unwrap();
        r.username = Some("u".into());
        r.password = Some("p".into());
        c
    }

    fn none(_: &str) -> Option<Credentials> {
        None
    }

    fn src(kind: &str, protocol: Option<&str>, server: Option<&str>, alias: &str) -> InstanceSource {
        InstanceSource {
            kind: kind.into(),
            protocol: protocol.map(Into::into),
            server: server.map(Into::into),
            alias: Some(alias.into()),
            ..Default::default()
        }
    }

    #[test]
    fn mapping() {
        let c = cfg();
        let oci = Some("oci");
        assert_eq!(source("busybox", &c, none).unwrap(), src("image", None, None, "busybox"));
        assert_eq!(source("nginx:1.27", &c, none).unwrap(), src("image", None, None, "nginx:1.27"));
        assert_eq!(source("library/nginx", &c, none).unwrap(), src("image", None, None, "library/nginx"));
        assert_eq!(source("local:busybox", &c, none).unwrap(), src("image", None, None, "busybox"));
        for r in
            ["docker.io/library/nginx:1.27", "ghcr.io/x/y", "127.0.0.1:5000/x:t", "localhost/a", "q.io/a@sha256:00"]
        {
            assert_eq!(source(r, &c, none).unwrap(), src("image", oci, None, r), "{r}");
        }
        assert_eq!(
            source("lan:path/name:tag", &c, none).unwrap(),
            src("image", oci, Some("http://127.0.0.1:5000"), "path/name:tag")
        );
        assert!(source("lan:", &c, none).is_err());
        assert!(source("", &c, none).is_err());
    }

    #[test]
    fn credentials() {
        let c = cfg();
        let seen = std::cell::RefCell::new(Vec::new());
        let lookup = |h: &str| {
            seen.borrow_mut().push(h.to_string());
            Some(Credentials { username: "d".into(), password: "x".into() })
        };
        let stored = Credentials { username: "u".into(), password: "p".into() }.secret();
        assert_eq!(source("corp:a/b", &c, lookup).unwrap().secret, Some(stored));
        assert_eq!(source("lan:a", &c, lookup).unwrap().secret.as_deref(), Some("ZDp4"));
        source("ghcr.io/x/y:1", &c, lookup).unwrap();
        source("busybox", &c, lookup).unwrap();
        assert_eq!(*seen.borrow(), ["127.0.0.1:5000", "ghcr.io", "docker.io"]);
    }

    #[test]
    fn default_remote() {
        let mut c = cfg();
        c.default_remote = "lan".into();
        assert_eq!(
            source("busybox", &c, none).unwrap(),
            src("image", Some("oci"), Some("http://127.0.0.1:5000"), "busybox")
        );
        c.default_remote = "gone".into();
        assert!(source("busybox", &c, none).is_err());
    }
}
