#![no_main]
//! cargo-fuzz target: see `disk_image::fuzzing::qcow2`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    disk_image::fuzzing::qcow2(data);
});
