//! Key-set rotation: each way a key set can fail to follow the trusted one, pinned to its error.

use flotilla_shared::bundle::Signature;
use flotilla_shared::keyset::{KeySet, KeySetError, SignedKeySet, TrustedKeys, SIGNING_CONTEXT};
use flotilla_shared::SecretKey;

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

/// Key set 1: keys 1 and 2, both needed.
fn root() -> TrustedKeys {
    TrustedKeys::new(1, vec![key(1).public(), key(2).public()], 2).unwrap()
}

fn set(version: u64, keys: &[u8], threshold: u32) -> KeySet {
    KeySet::new(
        version,
        keys.iter().map(|n| key(*n).public()).collect(),
        threshold,
        1_800_000_000,
    )
}

fn signed(set: &KeySet, signers: &[u8]) -> SignedKeySet {
    let mut signed = SignedKeySet::new(set);
    for n in signers {
        signed.add_signature(&key(*n));
    }
    signed
}

#[test]
fn a_set_signed_by_the_old_and_the_new_keys_replaces_them() {
    let next = set(2, &[2, 3], 1);
    let accepted = root().next(&signed(&next, &[1, 2, 3])).unwrap();
    assert_eq!(accepted.keys.version(), 2);
    assert_eq!(accepted.keys.threshold(), 1);
    assert_eq!(accepted.set, next);
    assert_eq!(
        accepted.signed_by.len(),
        2,
        "both keys of set 1 counted: {:?}",
        accepted.signed_by
    );
    assert!(accepted.keys.accepts_signers(&[key(3).public().id()]));
    assert!(
        !accepted.keys.accepts_signers(&[key(1).public().id()]),
        "key 1 was retired"
    );
}

#[test]
fn a_set_signed_only_by_its_own_keys_is_refused() {
    let next = set(2, &[3], 1);
    let err = root().next(&signed(&next, &[3])).unwrap_err();
    assert_eq!(
        err,
        KeySetError::ThresholdNotMet {
            version: 2,
            by: 1,
            valid: 0,
            required: 2,
            repeated: 0
        }
    );
}

#[test]
fn a_set_its_own_keys_did_not_sign_is_refused() {
    // The new keys must agree too: the old ones alone do not make a set.
    let next = set(2, &[3, 4], 1);
    let err = root().next(&signed(&next, &[1, 2])).unwrap_err();
    assert!(
        matches!(
            err,
            KeySetError::ThresholdNotMet {
                by: 2,
                valid: 0,
                required: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_set_can_name_a_new_control_plane_key() {
    let mut next = set(2, &[1, 2], 2);
    next.control_plane = Some(key(7).public());
    let accepted = root().next(&signed(&next, &[1, 2])).unwrap();
    assert_eq!(accepted.set.control_plane, Some(key(7).public()));
    let round_trip = SignedKeySet::decode(&signed(&next, &[1]).encode()).unwrap();
    assert_eq!(round_trip.key_set().unwrap(), next);
}

#[test]
fn one_key_signing_twice_counts_once() {
    let next = set(2, &[1, 2], 2);
    let mut twice = signed(&next, &[1]);
    twice.signatures.push(twice.signatures[0].clone());
    let err = root().next(&twice).unwrap_err();
    assert_eq!(
        err,
        KeySetError::ThresholdNotMet {
            version: 2,
            by: 1,
            valid: 1,
            required: 2,
            repeated: 1
        }
    );
    assert!(
        err.to_string()
            .contains("1 repeated signature(s) not counted"),
        "{err}"
    );
}

#[test]
fn skipping_a_version_is_refused_and_the_chain_is_followed_in_order() {
    let two = signed(&set(2, &[2, 3], 1), &[1, 2, 3]);
    let three = signed(&set(3, &[4], 1), &[3, 4]);

    let err = root().next(&three).unwrap_err();
    assert_eq!(
        err,
        KeySetError::Skips {
            version: 3,
            current: 1
        }
    );
    assert!(err.to_string().contains("key set 2 is missing"), "{err}");

    // Sent out of order, the chain still applies one version after the other.
    let followed = root().follow(&[three.clone(), two.clone()]);
    assert!(followed.refused.is_none(), "{:?}", followed.refused);
    let versions: Vec<u64> = followed.accepted.iter().map(|a| a.keys.version()).collect();
    assert_eq!(versions, [2, 3]);

    let gap = root().follow(&[three]);
    assert!(gap.accepted.is_empty());
    assert_eq!(
        gap.refused,
        Some(KeySetError::Skips {
            version: 3,
            current: 1
        })
    );
}

#[test]
fn replayed_and_older_sets_change_nothing() {
    let two = signed(&set(2, &[2, 3], 1), &[1, 2, 3]);
    let now = root().next(&two).unwrap().keys;
    assert_eq!(
        now.next(&two).unwrap_err(),
        KeySetError::NotNewer {
            version: 2,
            current: 2
        }
    );
    let stale = signed(&set(1, &[9], 1), &[9]);
    assert_eq!(
        now.next(&stale).unwrap_err(),
        KeySetError::NotNewer {
            version: 1,
            current: 2
        }
    );
    let followed = now.follow(&[stale, two]);
    assert!(followed.accepted.is_empty() && followed.refused.is_none());
}

#[test]
fn an_altered_set_or_signature_does_not_verify() {
    let next = set(2, &[2, 3], 1);
    let good = signed(&next, &[1, 2, 3]);

    let mut widened = next.clone();
    widened.publishers.push(key(9).public());
    let swapped = SignedKeySet {
        signatures: good.signatures.clone(),
        ..SignedKeySet::new(&widened)
    };
    assert!(matches!(
        root().next(&swapped).unwrap_err(),
        KeySetError::SignatureInvalid { version: 2, .. }
    ));

    let mut flipped = good.clone();
    flipped.signatures[0].signature[10] ^= 0x01;
    assert_eq!(
        root().next(&flipped).unwrap_err(),
        KeySetError::SignatureInvalid {
            version: 2,
            key_id: key(1).public().id()
        }
    );
}

#[test]
fn a_signature_over_the_bare_body_does_not_count() {
    // Without the context, a signature made for something else over the same bytes (a
    // manifest, a desired state) could pass for one over a key set.
    let next = set(2, &[1, 2], 1);
    let mut bare = SignedKeySet::new(&next);
    for n in [1, 2] {
        bare.signatures.push(Signature {
            key_id: key(n).public().id(),
            signature: key(n).sign(&bare.body).to_vec(),
        });
    }
    assert!(matches!(
        root().next(&bare).unwrap_err(),
        KeySetError::SignatureInvalid { .. }
    ));
    let mut with_context = SignedKeySet::new(&next);
    for n in [1, 2] {
        with_context.signatures.push(Signature {
            key_id: key(n).public().id(),
            signature: key(n)
                .sign(&[SIGNING_CONTEXT, &next_body(&next)].concat())
                .to_vec(),
        });
    }
    assert!(root().next(&with_context).is_ok());
}

fn next_body(set: &KeySet) -> Vec<u8> {
    SignedKeySet::new(set).body
}

#[test]
fn sets_that_contradict_themselves_are_invalid() {
    let cases = [
        (set(2, &[], 1), "lists no publisher key"),
        (set(2, &[1, 2], 0), "at least 1"),
        (set(2, &[1, 1], 2), "exceeds its 1 distinct key(s)"),
    ];
    for (bad, expected) in cases {
        let err = root().next(&signed(&bad, &[1, 2])).unwrap_err();
        assert!(
            matches!(&err, KeySetError::Invalid { version: 2, reason } if reason.contains(expected)),
            "{err}"
        );
    }
    let mut bad_floor = set(2, &[1, 2], 1);
    bad_floor.reset_floors.insert("../escape".into(), 3);
    let err = root().next(&signed(&bad_floor, &[1, 2])).unwrap_err();
    assert!(err.to_string().contains("reset_floors"), "{err}");

    let mut both_roles = set(2, &[1, 2], 1);
    both_roles.control_plane = Some(key(2).public());
    let err = root().next(&signed(&both_roles, &[1, 2])).unwrap_err();
    assert!(err.to_string().contains("also a publisher key"), "{err}");

    let mut future = set(2, &[1, 2], 1);
    future.format_version = 9;
    assert_eq!(
        root().next(&signed(&future, &[1, 2])).unwrap_err(),
        KeySetError::UnsupportedFormat {
            version: 2,
            format: 9
        }
    );
}

#[test]
fn garbage_truncated_and_oversized_files_are_malformed() {
    let bytes = signed(&set(2, &[2, 3], 1), &[1, 2, 3]).encode();
    assert_eq!(SignedKeySet::decode(&bytes).unwrap().encode(), bytes);
    for bad in [&b"not cbor"[..], &bytes[..bytes.len() - 3]] {
        assert!(matches!(
            SignedKeySet::decode(bad),
            Err(KeySetError::Malformed(_))
        ));
    }
    let huge = vec![0u8; flotilla_shared::keyset::MAX_KEY_SET_BYTES + 1];
    let err = SignedKeySet::decode(&huge).unwrap_err();
    assert!(err.to_string().contains("byte limit"), "{err}");

    // Signed, but not a key set: decoded only after the signatures verified.
    let mut not_a_set = SignedKeySet {
        version: 2,
        body: b"\xa1\x61x\x01".to_vec(),
        signatures: vec![],
    };
    assert!(matches!(
        root().follow(&[not_a_set.clone()]).refused,
        Some(KeySetError::ThresholdNotMet { .. })
    ));
    not_a_set.add_signature(&key(1));
    not_a_set.add_signature(&key(2));
    assert!(matches!(
        root().follow(&[not_a_set]).refused,
        Some(KeySetError::Malformed(_))
    ));

    // The version outside must be the one inside.
    let mut relabelled = signed(&set(3, &[1, 2], 1), &[1, 2]);
    relabelled.version = 2;
    let err = root().next(&relabelled).unwrap_err();
    assert_eq!(
        err,
        KeySetError::Malformed("key set 2 holds key set 3".into())
    );
}

#[test]
fn new_keys_verify_bundles_and_a_set_is_trusted_keys_in_itself() {
    let err = TrustedKeys::new(1, vec![key(1).public()], 2).unwrap_err();
    assert!(err.to_string().contains("exceeds"), "{err}");
    let keys = TrustedKeys::new(1, vec![key(1).public(), key(1).public()], 1).unwrap();
    assert_eq!(keys.publishers().len(), 1, "a key listed twice counts once");
    assert!(keys.accepts_signers(&[key(1).public().id(), key(1).public().id()]));
    assert!(!keys.accepts_signers(&[key(2).public().id()]));
}
