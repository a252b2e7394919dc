//! `/1.0/networks`: the managed bridge.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A network.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Network {
    /// `skiffbr0`.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// `bridge`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Whether Skiff manages it.
    pub managed: bool,
    /// `Created`.
    #[serde(default)]
    pub status: String,
    /// `ipv4.address` (`10.118.0.1/24`), `ipv4.nat`, `dns.domain`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Instances using it (`/1.0/instances/web`).
    #[serde(default)]
    pub used_by: Vec<String>,
    /// Cluster members (none).
    #[serde(default)]
    pub locations: Vec<String>,
}

/// `GET /1.0/networks/{name}/leases`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkLease {
    /// The instance's hostname.
    pub hostname: String,
    /// MAC.
    pub hwaddr: String,
    /// Address.
    pub address: String,
    /// `dynamic`.
    #[serde(rename = "type")]
    pub kind: String,
    /// "none".
    #[serde(default)]
    pub location: String,
}
