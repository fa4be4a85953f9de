//! Fuzz target: arbitrary bytes through the manifest decoder and the container parser.
//!
//! The input is tried both as bare manifest CBOR and as a whole container. Neither may panic,
//! a decoded manifest must survive an encode-decode round trip, and a parsed container must
//! parse back to the same sections once written out again.

#![no_main]

use flotilla_shared::bundle::decode_manifest;
use flotilla_shared::Bundle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = decode_manifest(data) {
        // The first encoding normalises (integer widths, float widths, map order); after that,
        // decoding and encoding again must be a fixed point.
        let encoded = serde_cbor::to_vec(&manifest)
            .expect("invariant: a decoded manifest always encodes as CBOR");
        let again = decode_manifest(&encoded)
            .unwrap_or_else(|e| panic!("a re-encoded manifest no longer decodes: {e}"));
        let encoded_again = serde_cbor::to_vec(&again)
            .expect("invariant: a decoded manifest always encodes as CBOR");
        assert_eq!(encoded, encoded_again, "manifest encoding is not stable");
    }

    let Ok(bundle) = Bundle::parse(data) else {
        return;
    };
    let _ = bundle.decode_manifest_unverified();
    let _ = bundle.digest();

    let written = bundle.to_bytes();
    let reparsed = Bundle::parse(&written)
        .unwrap_or_else(|e| panic!("a written-out container no longer parses: {e}"));
    assert_eq!(reparsed.manifest_bytes, bundle.manifest_bytes);
    assert_eq!(reparsed.signatures, bundle.signatures);
    assert_eq!(reparsed.payload, bundle.payload);
});
