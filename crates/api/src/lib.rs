//! The types of Skiff's REST API, in the shapes of the Incus/LXD `/1.0`
//! API so that clients written for that API (Debian's `lxc`, pylxd) work
//! against `skiffd` unchanged. Shared by the daemon, the `skiff` CLI and the
//! tests; this crate depends on nothing else of Skiff.
//!
//! Every answer is wrapped in a [`Response`] envelope: `sync` (the result
//! in `metadata`), `async` (an [`Operation`] to follow at
//! `/1.0/operations/{id}`), or `error` (`error_code` is the HTTP status).
//! Timestamps are RFC 3339 strings in UTC ([`time::now`]).

pub mod event;
pub mod exec;
pub mod files;
pub mod image;
pub mod instance;
pub mod network;
pub mod operation;
pub mod response;
pub mod server;
pub mod time;

pub use event::{Event, EventType, LifecycleEvent, LoggingEvent};
pub use exec::{ExecControl, ExecPost};
pub use image::{Image, ImageAlias, ImageAliasesEntry, ImageAliasesPost};
pub use instance::{
    Instance, InstanceFull, InstancePut, InstanceSnapshot, InstanceSnapshotPost, InstanceSnapshotsPost, InstanceSource,
    InstanceState, InstanceStatePut, InstanceType, InstancesPost, StateAction, StatusCode,
};
pub use network::{Network, NetworkLease};
pub use operation::{Operation, OperationClass};
pub use response::{ApiError, Response, ResponseType};
pub use server::{Server, ServerEnvironment};

/// The API version in every path.
pub const API_VERSION: &str = "1.0";
/// The only project (Skiff has no projects yet; clients send `?project=default`).
pub const DEFAULT_PROJECT: &str = "default";

/// Whether `name` is a valid instance or snapshot name: 1-63 characters of
/// ASCII letters, digits and `-`, starting with a letter, not ending with
/// `-` (Incus's rule, which is also a valid DNS label).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphabetic()
        && b[b.len() - 1] != b'-'
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "web", "web-1", "A0", &"x".repeat(63)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-a", "1a", "a-", "a_b", "a.b", "a/b", "..", &"x".repeat(64), "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
