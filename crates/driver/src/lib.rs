//! Instance drivers behind one trait (the thin-VM driver; LXC later)
