//! Capped reads of what a registry sends into memory: manifests, indexes,
//! configs, and the bodies of its error answers.
//!
//! `oci-client` reads a manifest (and every error body) whole, however
//! large the registry makes it; so these are fetched here instead, with
//! the credentials `oci-client` negotiated. The `Content-Length` is checked
//! before anything is read, and the bytes are counted as they arrive (a
//! server may send no length, or lie). A blob with a descriptor may not be
//! longer than the descriptor says.
//!
//! The limits: manifests and indexes 4 MiB, as containerd
//! (`remotes/docker/resolver.go`: `MaxManifestSize int64 = 4 * 1048 *
//! 1048`) and as the distribution registry accepts on push
//! (`registry/handlers/manifests.go`: `maxManifestBodySize = 4 << 20`);
//! configs 8 MiB (a config's history and env grow with the image: twice
//! the manifest limit); an error body is kept up to 64 KiB, the rest
//! dropped.

use std::time::Duration;

/// Largest manifest or index.
pub const MAX_MANIFEST: u64 = 4 << 20;
/// Largest image config.
pub const MAX_CONFIG: u64 = 8 << 20;
/// Most of an error body kept (for the message).
pub const MAX_ERROR_BODY: u64 = 64 << 10;

/// A capped read that failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The request failed (connection, TLS, timeout, redirect loop).
    #[error("GET {url}")]
    Http {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with an error.
    #[error("GET {url}: HTTP {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
        /// The start of the answer's body.
        body: String,
    },
    /// Larger than the limit (said by `Content-Length`, by the descriptor,
    /// or counted).
    #[error("{what} at {url}: {size} bytes or more, over the {limit}-byte limit")]
    TooLarge {
        /// `manifest`, `image config`.
        what: &'static str,
        /// The URL.
        url: String,
        /// How large it says or turned out to be.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Longer than its descriptor declares.
    #[error("{what} at {url}: more than the {declared} bytes its descriptor declares")]
    LongerThanDeclared {
        /// `manifest`, `image config`.
        what: &'static str,
        /// The URL.
        url: String,
        /// The descriptor's size.
        declared: u64,
    },
}

/// How a request authenticates.
#[derive(Clone, Debug, Default)]
pub enum Auth {
    /// Nothing.
    #[default]
    Anonymous,
    /// HTTP basic.
    Basic(String, String),
    /// A bearer token.
    Bearer(String),
}

/// GETs against one repository of one registry.
pub struct Fetcher {
    http: reqwest::Client,
    /// `scheme://host[:port]/v2/<repository>/`.
    base: String,
    auth: Auth,
}

/// What a GET brought.
pub struct Body {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// The `Content-Type`, if any.
    pub content_type: Option<String>,
}

impl Fetcher {
    /// A fetcher for `repository` at `registry` (`host[:port]`) over
    /// `scheme`.
    pub fn new(scheme: &str, registry: &str, repository: &str, auth: Auth) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .user_agent(concat!("skiff-oci/", env!("CARGO_PKG_VERSION")))
            .build()
            // Only a broken TLS setup fails here; no request works then.
            .unwrap_or_default();
        Self {
            http,
            base: format!("{scheme}://{registry}/v2/{repository}/"),
            auth,
        }
    }

    /// GETs `path` (`manifests/<ref>`, `blobs/<digest>`) into memory: at
    /// most `limit` bytes, and at most `declared` when a descriptor gives
    /// the size.
    pub async fn get(
        &self,
        path: &str,
        accept: &[&str],
        what: &'static str,
        limit: u64,
        declared: Option<u64>,
    ) -> Result<Body, FetchError> {
        let url = format!("{}{path}", self.base);
        let too_large = |size| FetchError::TooLarge {
            what,
            url: url.clone(),
            size,
            limit,
        };
        if let Some(d) = declared.filter(|&d| d > limit) {
            return Err(too_large(d));
        }
        let mut req = self.http.get(&url);
        if !accept.is_empty() {
            req = req.header(reqwest::header::ACCEPT, accept.join(", "));
        }
        req = match &self.auth {
            Auth::Anonymous => req,
            Auth::Basic(u, p) => req.basic_auth(u, Some(p)),
            Auth::Bearer(t) => req.bearer_auth(t),
        };
        let http_err = |source| FetchError::Http {
            url: url.clone(),
            source,
        };
        let mut resp = req.send().await.map_err(http_err)?;
        let status = resp.status();
        if !status.is_success() {
            let (body, _) = read_capped(&mut resp, MAX_ERROR_BODY)
                .await
                .unwrap_or_default();
            return Err(FetchError::Status {
                url,
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        let longer = || FetchError::LongerThanDeclared {
            what,
            url: url.clone(),
            declared: declared.unwrap_or(0),
        };
        if let Some(len) = resp.content_length() {
            if len > limit {
                return Err(too_large(len));
            }
            if declared.is_some_and(|d| len > d) {
                return Err(longer());
            }
        }
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let cap = declared.unwrap_or(limit).min(limit);
        let (bytes, over) = read_capped(&mut resp, cap).await.map_err(http_err)?;
        if over {
            return Err(match declared {
                Some(d) if d <= limit => longer(),
                _ => too_large(bytes.len() as u64 + 1),
            });
        }
        Ok(Body {
            bytes,
            content_type,
        })
    }
}

/// Reads at most `cap` bytes of the body; `true` when more came (the rest
/// is not read).
async fn read_capped(
    resp: &mut reqwest::Response,
    cap: u64,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if out.len() as u64 + chunk.len() as u64 > cap {
            let room = (cap - out.len() as u64) as usize;
            out.extend_from_slice(&chunk[..room]);
            return Ok((out, true));
        }
        out.extend_from_slice(&chunk);
    }
    Ok((out, false))
}
