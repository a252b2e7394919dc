#![no_main]
//! cargo-fuzz target: see `skiff_run::fuzzing::control_request`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    skiff_run::fuzzing::control_request(data);
});
