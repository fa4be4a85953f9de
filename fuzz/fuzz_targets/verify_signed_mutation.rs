//! Fuzz target: a manifest and a few edits, signed by the harness, through the full verifier.
//!
//! The input layout is described in `flotilla_fuzz::mutation`: an edit header, then manifest
//! CBOR. The harness rebuilds a payload from the manifest's file list, applies the requested
//! fix-ups and tampering, signs with the trusted key and frames it all with `assemble`, so every
//! run reaches the checks after the signature. A CBOR-aware mutator
//! (`flotilla_fuzz::structured`) keeps most mutated inputs decodable.

#![no_main]

use flotilla_fuzz::{fixtures, mutation, oracle, structured};
use libfuzzer_sys::{fuzz_mutator, fuzz_target, fuzzer_mutate};

fuzz_target!(|data: &[u8]| {
    let Some((edits, manifest_bytes)) = mutation::split_input(data) else {
        return;
    };
    let bundle = mutation::signed_bundle_from_input(edits, manifest_bytes);
    let _ = oracle::verify_and_check(fixtures::verifier(), &bundle);
});

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    structured::mutate_input(data, size, max_size, seed, &mut fuzzer_mutate)
});
