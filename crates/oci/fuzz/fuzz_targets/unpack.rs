//! Arbitrary bytes as one or two layers (plain, gzip or zstd) through the
//! unpacker with small caps: see `skiff_oci::fuzzing::unpack_layer`.
//! Errors are fine; panics, hangs and escapes are not.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    skiff_oci::fuzzing::unpack_layer(data);
});
