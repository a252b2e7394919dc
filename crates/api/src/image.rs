//! `/1.0/images` and `/1.0/images/aliases`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An image in the local store.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Image {
    /// Its fingerprint (the manifest digest's hex).
    pub fingerprint: String,
    /// Aliases pointing at it.
    #[serde(default)]
    pub aliases: Vec<ImageAlias>,
    /// x86_64.
    pub architecture: String,
    /// Whether it was pulled on demand (always true for OCI pulls).
    #[serde(default)]
    pub cached: bool,
    /// Anyone may use it.
    #[serde(default)]
    pub public: bool,
    /// Free-form properties (`os`, `description`, `oci.reference`).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Bytes of its blobs.
    pub size: u64,
    /// `oci`.
    #[serde(default, rename = "type")]
    pub kind: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    #[serde(default)]
    pub uploaded_at: String,
    /// RFC 3339.
    #[serde(default)]
    pub last_used_at: String,
    /// Where it came from.
    #[serde(default)]
    pub update_source: Option<ImageSource>,
    /// The file name (the reference).
    #[serde(default)]
    pub filename: String,
}

/// Where an image came from.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ImageSource {
    /// The reference or alias asked for.
    pub alias: String,
    /// The registry URL.
    pub server: String,
    /// `oci`.
    pub protocol: String,
}

/// An alias as listed in an image.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ImageAlias {
    /// The alias.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// `GET /1.0/images/aliases/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ImageAliasesEntry {
    /// The alias.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// The image's fingerprint.
    pub target: String,
    /// `container` or `virtual-machine`.
    #[serde(default, rename = "type")]
    pub kind: String,
}

/// `POST /1.0/images/aliases`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ImageAliasesPost {
    /// The alias.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// The image's fingerprint.
    pub target: String,
}
