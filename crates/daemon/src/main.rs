//! skiffd: Skiff's daemon, the REST API over a Unix socket

fn main() {}
