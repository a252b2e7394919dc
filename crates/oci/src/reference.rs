//! Image references as people type them (`nginx`, `ghcr.io/org/app@sha256:…`,
//! `localhost:5000/x/y:tag`), normalised the way Docker does: a missing
//! registry is Docker Hub (`docker.io`), a one-component Hub repository lives
//! under `library/`, and a missing tag is `latest`.

use std::fmt;

use crate::digest::Digest;

/// The registry used when a reference names none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag used when a reference names neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

/// A malformed reference; each variant names the text it refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// Nothing was given.
    #[error("empty image reference")]
    Empty,
    /// Longer than the 255 characters a repository name may have.
    #[error("image reference {0:?}: repository name longer than 255 characters")]
    TooLong(String),
    /// A path component of the repository is not lowercase alphanumerics
    /// with single separators.
    #[error("image reference {reference:?}: invalid repository component {component:?} (lowercase letters, digits and separators . _ __ - only)")]
    Component {
        /// The whole reference.
        reference: String,
        /// The offending component.
        component: String,
    },
    /// The registry host (or port) is malformed.
    #[error("image reference {reference:?}: invalid registry {registry:?}")]
    Registry {
        /// The whole reference.
        reference: String,
        /// The offending registry.
        registry: String,
    },
    /// The tag is malformed.
    #[error("image reference {reference:?}: invalid tag {tag:?} (letters, digits, _ . -; at most 128, not starting with . or -)")]
    Tag {
        /// The whole reference.
        reference: String,
        /// The offending tag.
        tag: String,
    },
    /// The digest after `@` is malformed.
    #[error("image reference {reference:?}: invalid digest")]
    Digest {
        /// The whole reference.
        reference: String,
        /// Why the digest was refused.
        #[source]
        source: crate::digest::DigestError,
    },
}

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses a reference as a user would type it.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (name_tag, digest) = match s.rsplit_once('@') {
            Some((n, d)) => {
                let digest = Digest::parse(d).map_err(|source| ReferenceError::Digest {
                    reference: input.to_string(),
                    source,
                })?;
                (n, Some(digest))
            }
            None => (s, None),
        };
        // A ':' after the last '/' is a tag separator, one before it belongs
        // to the registry's port.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (
                &name_tag[..last_slash + i],
                Some(name_tag[last_slash + i + 1..].to_string()),
            ),
            None => (name_tag, None),
        };
        if name.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DEFAULT_REGISTRY.to_string(),
            _ => registry,
        };
        if !valid_registry(&registry) {
            return Err(ReferenceError::Registry {
                reference: input.to_string(),
                registry,
            });
        }
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if repository.len() > 255 {
            return Err(ReferenceError::TooLong(input.to_string()));
        }
        for component in repository.split('/') {
            if !valid_component(component) {
                return Err(ReferenceError::Component {
                    reference: input.to_string(),
                    component: component.to_string(),
                });
            }
        }
        if let Some(t) = &tag {
            if !valid_tag(t) {
                return Err(ReferenceError::Tag {
                    reference: input.to_string(),
                    tag: t.clone(),
                });
            }
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            _ => tag,
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The registry host, with its port if any (`docker.io`, `localhost:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path (`library/nginx`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any (`latest` when neither tag nor digest was given).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// Whether the registry is on this machine (plain http is then allowed):
    /// `localhost`, `[::1]`, or a literal IPv4 address in 127.0.0.0/8. A
    /// name such as `127.example.com` or `127.0.0.1.nip.io` is not: DNS may
    /// send it anywhere.
    pub fn is_local(&self) -> bool {
        let host = self.host();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || bare
                .parse::<std::net::Ipv6Addr>()
                .is_ok_and(|a| a.is_loopback())
            || host
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|a| a.is_loopback())
    }

    /// The registry host without its port.
    pub fn host(&self) -> &str {
        if self.registry.starts_with('[') {
            return match self.registry.find(']') {
                Some(i) => &self.registry[..=i],
                None => &self.registry,
            };
        }
        self.registry
            .rsplit_once(':')
            .map_or(self.registry.as_str(), |(h, _)| h)
    }

    /// The same reference pinned to `digest` (the tag is kept for display).
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// The form `oci-client` speaks.
    pub fn to_client(&self) -> oci_client::Reference {
        match (&self.tag, &self.digest) {
            (Some(t), Some(d)) => oci_client::Reference::with_tag_and_digest(
                self.registry.clone(),
                self.repository.clone(),
                t.clone(),
                d.to_string(),
            ),
            (None, Some(d)) => oci_client::Reference::with_digest(
                self.registry.clone(),
                self.repository.clone(),
                d.to_string(),
            ),
            (t, None) => oci_client::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                t.clone().unwrap_or_else(|| DEFAULT_TAG.to_string()),
            ),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn valid_registry(r: &str) -> bool {
    let (host, port) = if let Some(rest) = r.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':')),
            None => return false,
        }
    } else {
        match r.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (r, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':')
        && !host.starts_with('-')
        && !host.starts_with('.')
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`
fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || x == b'_' || x == b'.' || x == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_defaults() {
        let cases = [
            ("nginx", "docker.io/library/nginx:latest"),
            ("nginx:1.27", "docker.io/library/nginx:1.27"),
            ("library/nginx", "docker.io/library/nginx:latest"),
            ("docker.io/library/nginx", "docker.io/library/nginx:latest"),
            ("docker.io/nginx", "docker.io/library/nginx:latest"),
            ("index.docker.io/nginx:x", "docker.io/library/nginx:x"),
            ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
            ("localhost/x", "localhost/x:latest"),
            ("localhost:5000/x/y:tag", "localhost:5000/x/y:tag"),
            ("127.0.0.1:5000/a:b", "127.0.0.1:5000/a:b"),
            ("ghcr.io/org/app:v1.2-rc_3", "ghcr.io/org/app:v1.2-rc_3"),
            ("quay.io/a/b/c/d", "quay.io/a/b/c/d:latest"),
            ("[::1]:5000/img:t", "[::1]:5000/img:t"),
        ];
        for (input, want) in cases {
            assert_eq!(p(input).to_string(), want, "{input}");
        }
    }

    #[test]
    fn digests() {
        let d = "sha256:".to_string() + &"ab".repeat(32);
        let r = p(&format!("ghcr.io/org/app@{d}"));
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().to_string(), d);
        assert_eq!(r.to_string(), format!("ghcr.io/org/app@{d}"));
        let r = p(&format!("nginx:1.27@{d}"));
        assert_eq!(r.tag(), Some("1.27"));
        assert_eq!(r.repository(), "library/nginx");
        let c = r.to_client();
        assert_eq!(c.digest(), Some(d.as_str()));
        assert_eq!(c.repository(), "library/nginx");
    }

    #[test]
    fn parts_and_locality() {
        let r = p("localhost:5000/x/y:tag");
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.host(), "localhost");
        assert_eq!(r.repository(), "x/y");
        assert!(r.is_local());
        assert!(p("127.0.0.1:40000/a").is_local());
        assert!(!p("nginx").is_local());
        assert!(!p("ghcr.io/a/b").is_local());
    }

    #[test]
    fn only_literal_loopback_addresses_are_local() {
        for local in [
            "127.1.2.3/a",
            "127.0.0.1:5000/a",
            "localhost:5000/a",
            "[::1]:5000/a",
        ] {
            assert!(p(local).is_local(), "{local}");
        }
        // Names that merely start like a loopback address resolve anywhere.
        for remote in [
            "127.example.com/a",
            "127.0.0.1.nip.io/a",
            "127.0.0.1.nip.io:5000/a",
            "localhost.example.com/a",
            "128.0.0.1/a",
            "[::2]:5000/a",
        ] {
            assert!(!p(remote).is_local(), "{remote}");
        }
        assert_eq!(p("[::1]:5000/img").host(), "[::1]");
    }

    #[test]
    fn malformed() {
        assert_eq!(Reference::parse(""), Err(ReferenceError::Empty));
        assert_eq!(Reference::parse("  "), Err(ReferenceError::Empty));
        for bad in [
            "Nginx",
            "nginx:",
            "nginx:-x",
            "a//b",
            "a/b/",
            "/a",
            "nginx@sha256:xyz",
            "nginx@md5:abc",
            "a..b",
            "a_-b",
            "host:99999999/a",
            ":tag",
            "a b",
            "nginx:ta g",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad} should be refused");
        }
        let long = "a".repeat(300);
        assert_eq!(
            Reference::parse(&long),
            Err(ReferenceError::TooLong(long.clone()))
        );
        let e = Reference::parse("Foo/Bar").unwrap_err().to_string();
        assert!(e.contains("Foo/Bar") && e.contains("\"Foo\""), "{e}");
        let e = Reference::parse("x:ta$g").unwrap_err().to_string();
        assert!(e.contains("invalid tag"), "{e}");
    }
}
