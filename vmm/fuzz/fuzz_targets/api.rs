#![no_main]
//! cargo-fuzz target: the control API's request parser and router (see
//! `skiff_vmm::api::fuzz_requests`). `cargo +nightly fuzz run api` in vmm/.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    skiff_vmm::api::fuzz_requests(data);
});
