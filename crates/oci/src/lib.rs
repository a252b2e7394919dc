//! OCI images: references, pull, verify, unpack, store
