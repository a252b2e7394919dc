//! OCI images for Skiff: references, pull from registries, verification,
//! a content-addressed store, safe unpacking into a rootfs, and the run
//! spec an image's config implies.
//!
//! The pieces, in the order an image goes through them:
//! [`reference`](mod@reference) parses what a user types; [`pull`] (or [`import`]) brings
//! manifests, config and layers into the [`store`], verified by digest and
//! size; [`bundle`] unpacks them with [`unpack`] into a rootfs (atomically,
//! cached by manifest digest) and writes the runtime config from [`spec`].

#![warn(missing_docs)]

pub mod auth;
pub mod bundle;
pub mod digest;
#[cfg(test)]
mod fake_registry;
pub mod fetch;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod import;
pub mod manifest;
pub mod pull;
pub mod reference;
pub mod spec;
pub mod store;
pub mod unpack;

pub use digest::Digest;
pub use manifest::Platform;
pub use reference::Reference;
pub use store::{ImageRecord, Store};
