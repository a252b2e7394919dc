#![no_main]
//! cargo-fuzz target: see `virtio_devices::fuzzing::net_rx`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio_devices::fuzzing::net_rx(data);
});
