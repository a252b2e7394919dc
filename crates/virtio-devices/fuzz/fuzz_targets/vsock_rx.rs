#![no_main]
//! cargo-fuzz target: see `virtio_devices::fuzzing::vsock_rx`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio_devices::fuzzing::vsock_rx(data);
});
