//! Properties every verifier answer must have, checked by the verifying targets after each run.
//!
//! "Does not panic" is the floor. Above it, these checks make a wrong answer crash too: the full
//! and the header-only verification must agree, and a manifest the verifier accepted must have
//! chunk arithmetic that covers its payload exactly.

use flotilla_shared::verify::{chunk_is_valid, verify_payload};
use flotilla_shared::{Bundle, VerifiedBundle, Verifier, VerifyError};

/// Runs `verify` and `verify_header` on `data`, checks that they agree, and checks what an
/// accepted bundle promises. Returns the full verification's answer.
pub fn verify_and_check(verifier: &Verifier, data: &[u8]) -> Result<VerifiedBundle, VerifyError> {
    let full = verifier.verify(data);
    let header = verifier.verify_header(data);

    match (&full, &header) {
        (Ok(full), Ok(header)) => assert!(
            same_verified(full, header),
            "full and header verification differ: {full:?} against {header:?}"
        ),
        (Ok(_), Err(e)) => panic!("full verification accepted what the header check refused: {e}"),
        // Header checks run first, so a header that fails must fail the whole bundle the same way.
        (Err(full), Err(header)) => assert_eq!(full, header, "the two refusals differ"),
        (Err(_), Ok(_)) => {}
    }

    if let Ok(verified) = &header {
        check_chunk_layout(verified);
    }
    if let Ok(verified) = &full {
        let payload = Bundle::parse(data)
            .expect("invariant: a verified bundle parses")
            .payload;
        check_accepted_payload(verified, payload);
    }
    full
}

/// Whether two verifications accepted the same thing. The manifests are compared by their CBOR
/// encoding, not `==`: a self-test may expect NaN, and NaN is unequal to itself.
fn same_verified(a: &VerifiedBundle, b: &VerifiedBundle) -> bool {
    let encode = |v: &VerifiedBundle| {
        serde_cbor::to_vec(&v.manifest).expect("invariant: a decoded manifest always encodes")
    };
    a.digest == b.digest && a.signed_by == b.signed_by && encode(a) == encode(b)
}

/// A verified manifest's chunks tile `0..payload_size`: in order, without gaps or overlap, each
/// `chunk_size` long but the last, and no range past the last chunk.
fn check_chunk_layout(verified: &VerifiedBundle) {
    let m = &verified.manifest;
    let mut next = 0u64;
    for index in 0..m.chunks.len() {
        let range = m
            .chunk_range(index)
            .unwrap_or_else(|| panic!("chunk {index} of {} has no range", m.chunks.len()));
        assert_eq!(
            range.start, next,
            "chunk {index} does not start where the last ended"
        );
        assert!(
            range.start < range.end,
            "chunk {index} is empty or inverted: {range:?}"
        );
        let length = range.end - range.start;
        let is_last = index + 1 == m.chunks.len();
        if is_last {
            assert!(
                length <= u64::from(m.chunk_size),
                "last chunk {index} is too long"
            );
        } else {
            assert_eq!(length, u64::from(m.chunk_size), "chunk {index} is short");
        }
        next = range.end;
    }
    assert_eq!(next, m.payload_size, "chunks do not cover the payload");
    assert!(
        m.chunk_range(m.chunks.len()).is_none(),
        "range past the last chunk"
    );
}

/// Every chunk of an accepted payload passes the downloader's per-chunk check, a chunk with one
/// byte changed or cut short fails it, and the payload check on its own agrees.
fn check_accepted_payload(verified: &VerifiedBundle, payload: &[u8]) {
    let m = &verified.manifest;
    for index in 0..m.chunks.len() {
        let range = m
            .chunk_range(index)
            .expect("invariant: check_chunk_layout saw a range for every chunk");
        let chunk = &payload[range.start as usize..range.end as usize];
        assert!(
            chunk_is_valid(m, index, chunk),
            "accepted chunk {index} is invalid"
        );

        let mut flipped = chunk.to_vec();
        flipped[0] ^= 0x01;
        assert!(
            !chunk_is_valid(m, index, &flipped),
            "flipped chunk {index} passes"
        );
        assert!(
            !chunk_is_valid(m, index, &chunk[1..]),
            "short chunk {index} passes"
        );
    }
    assert!(
        !chunk_is_valid(m, m.chunks.len(), b""),
        "a chunk past the end passes"
    );

    let again = verify_payload(&verified.digest, m, payload);
    assert_eq!(
        again,
        Ok(()),
        "payload check disagrees with full verification"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{embedding_template, signed_bundle, verifier};
    use flotilla_shared::tensor::{Tensor, TensorData};

    #[test]
    fn nan_in_a_self_test_expectation_is_not_a_disagreement() {
        // Found by verify_signed_mutation: the verifier accepts a NaN expected value, and an
        // oracle comparing manifests with `==` then saw two equal answers as different.
        let mut template = embedding_template();
        template.self_tests[0].expected = vec![Tensor::new(
            "embeddings",
            vec![1, 2],
            TensorData::Fp32(vec![f32::NAN, 0.8]),
        )
        .unwrap()];
        let (_, bytes) = signed_bundle(template);
        assert!(verify_and_check(verifier(), &bytes).is_ok());
    }

    #[test]
    fn a_refused_bundle_passes_the_oracle_with_its_error() {
        let (_, mut bytes) = signed_bundle(embedding_template());
        bytes.push(0);
        assert!(matches!(
            verify_and_check(verifier(), &bytes),
            Err(VerifyError::TrailingData { extra: 1, .. })
        ));
    }
}
