#![no_main]
//! cargo-fuzz target: see `virtio_devices::fuzzing::mem`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio_devices::fuzzing::mem(data);
});
