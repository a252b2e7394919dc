//! Feeds arbitrary bytes to the unpacker as one or two layers (split at the
//! first byte's position) and checks that nothing appears beside the
//! rootfs. Errors are fine; panics and escapes are not.

#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff_oci::unpack::{UnpackOptions, Unpacker};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("rootfs");
    std::fs::create_dir(&root).expect("rootfs");
    let opts = UnpackOptions {
        max_entry_size: 1 << 20,
        max_layer_size: 8 << 20,
        ..UnpackOptions::default()
    };
    let split = data.first().map_or(0, |&b| (b as usize * data.len()) / 256);
    let (a, b) = data.split_at(split);
    let mut u = Unpacker::new(&root, opts);
    if u.apply(a).is_ok() {
        let _ = u.apply(b);
    }
    let _ = u.finish();
    let beside: Vec<_> = std::fs::read_dir(dir.path()).expect("list").collect();
    assert_eq!(beside.len(), 1, "something was written beside the rootfs");
});
