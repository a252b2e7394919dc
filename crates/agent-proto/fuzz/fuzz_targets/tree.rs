#![no_main]
//! cargo-fuzz target: see `skiff_agent_proto::fuzzing::tree`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    skiff_agent_proto::fuzzing::tree(data);
});
