//! Instance root filesystems: copy-on-write volumes over unpacked images, and their snapshots
