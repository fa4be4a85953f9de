//! Fuzz target: arbitrary bytes as a whole bundle, through a verifier with every check on.
//!
//! The verifier trusts one fixed key and checks freshness, the sequence floor and the host (see
//! `flotilla_fuzz::fixtures::verifier`). Random bytes rarely get past the signature, so this
//! target mostly covers the framing and signature-block handling; the oracle checks that full and
//! header-only verification agree on every input.

#![no_main]

use flotilla_fuzz::{fixtures, oracle};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = oracle::verify_and_check(fixtures::verifier(), data);
});
