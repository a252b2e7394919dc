//! OCI images for Skiff: references, pull, verify, unpack, store.

pub mod digest;
pub mod manifest;
pub mod reference;
pub mod spec;
pub mod store;
pub mod unpack;
