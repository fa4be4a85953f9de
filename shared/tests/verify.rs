//! One test per way a bundle can be wrong, each pinned to its specific verifier error.

use flotilla_shared::bundle::{assemble, encode_payload, Signature};
use flotilla_shared::manifest::{
    Backend, FileEntry, Manifest, ModelMeta, Pooling, Requirements, SelfTest, SelfTestInput, Task,
    TextMeta, Truncation, DEFAULT_CHUNK_SIZE, MANIFEST_FORMAT_VERSION, MIN_CHUNK_SIZE,
};
use flotilla_shared::tensor::{Tensor, TensorData};
use flotilla_shared::{
    Bundle, BundleBuilder, BundleError, HostProfile, SecretKey, Sha256Digest, Verifier, VerifyError,
};

const NOW: u64 = 1_800_000_000;

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

fn template() -> Manifest {
    Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        name: "tiny-bert-embed".into(),
        version: semver::Version::new(1, 2, 0),
        sequence: 5,
        created_at: NOW - 100,
        expires_at: NOW + 1000,
        files: vec![],
        payload_size: 0,
        chunk_size: MIN_CHUNK_SIZE,
        chunks: vec![],
        model: ModelMeta {
            entry: "model.onnx".into(),
            opset: 14,
            inputs: vec![],
            outputs: vec![],
            task: Task::Embedding,
            text: Some(TextMeta {
                tokenizer: "tokenizer.json".into(),
                max_sequence_length: 128,
                truncation: Truncation::Truncate,
                pooling: Pooling::Mean,
                normalize: true,
                output: "last_hidden_state".into(),
            }),
            labels: vec![],
        },
        requirements: Requirements {
            min_agent_version: Some(semver::Version::new(0, 1, 0)),
            architectures: vec!["x86_64".into(), "aarch64".into()],
            backends: vec![Backend::Tract, Backend::Ort],
            accelerator: false,
        },
        self_tests: vec![SelfTest {
            name: "hello".into(),
            input: SelfTestInput::Texts(vec!["hello".into()]),
            expected: vec![
                Tensor::new("embeddings", vec![1, 2], TensorData::Fp32(vec![0.6, 0.8])).unwrap(),
            ],
            tolerance: 1e-4,
        }],
    }
}

fn files() -> Vec<(String, Vec<u8>)> {
    // Big enough for several chunks at the minimum chunk size.
    let model: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    vec![
        ("model.onnx".into(), model),
        ("tokenizer.json".into(), b"{\"vocab\":{}}".to_vec()),
    ]
}

fn build(manifest: Manifest, signers: &[&SecretKey]) -> Vec<u8> {
    let mut builder = BundleBuilder::new(manifest);
    for (path, data) in files() {
        builder = builder.file(path, data);
    }
    let (_, bytes) = builder.build().unwrap();
    sign(&bytes, signers)
}

fn sign(bytes: &[u8], signers: &[&SecretKey]) -> Vec<u8> {
    let mut bundle = Bundle::parse(bytes).unwrap();
    for k in signers {
        bundle.add_signature(k);
    }
    bundle.to_bytes()
}

/// Re-signs arbitrary manifest bytes with `signer` over `payload`, for manifests a correct packer
/// would never write.
fn forge(manifest_bytes: &[u8], payload: &[u8], signer: &SecretKey) -> Vec<u8> {
    let sig = Signature {
        key_id: signer.public().id(),
        signature: signer.sign(manifest_bytes).into(),
    };
    assemble(manifest_bytes, &[sig], payload)
}

/// A signed bundle whose manifest was edited after building (and then re-signed).
fn forge_edited(edit: impl FnOnce(&mut Manifest)) -> Vec<u8> {
    let bytes = build(template(), &[]);
    let bundle = Bundle::parse(&bytes).unwrap();
    let mut manifest = bundle.decode_manifest_unverified().unwrap();
    edit(&mut manifest);
    forge(
        &serde_cbor::to_vec(&manifest).unwrap(),
        bundle.payload,
        &key(1),
    )
}

fn verifier() -> Verifier {
    Verifier::new(&[key(1).public()], 1, NOW).unwrap()
}

fn host() -> HostProfile {
    HostProfile {
        architecture: "x86_64".into(),
        backends: vec![Backend::Tract],
        accelerator: false,
        agent_version: semver::Version::new(0, 1, 0),
    }
}

fn payload_offset(bytes: &[u8]) -> usize {
    bytes.len() - Bundle::parse(bytes).unwrap().payload.len()
}

#[test]
fn valid_bundle_verifies_with_all_checks_on() {
    let bytes = build(template(), &[&key(1)]);
    let v = verifier()
        .sequence_floor(4)
        .host(host())
        .verify(&bytes)
        .unwrap();
    assert_eq!(v.manifest.name, "tiny-bert-embed");
    assert_eq!(v.signed_by, vec![key(1).public().id()]);
    assert_eq!(v.digest, Bundle::parse(&bytes).unwrap().digest());
    assert_eq!(
        v.manifest.chunks.len(),
        v.manifest.payload_size.div_ceil(MIN_CHUNK_SIZE as u64) as usize
    );
}

#[test]
fn signing_does_not_change_the_digest() {
    let unsigned = build(template(), &[]);
    let signed = sign(&unsigned, &[&key(1), &key(2)]);
    assert_eq!(
        Bundle::parse(&unsigned).unwrap().digest(),
        Bundle::parse(&signed).unwrap().digest()
    );
}

#[test]
fn flipped_bit_in_manifest_is_an_invalid_signature() {
    let mut bytes = build(template(), &[&key(1)]);
    // Byte 20 lies inside the manifest (header is 14 bytes).
    bytes[20] ^= 0x01;
    assert!(matches!(
        verifier().verify(&bytes),
        Err(VerifyError::SignatureInvalid { .. })
    ));
}

#[test]
fn flipped_bit_in_signature_is_an_invalid_signature() {
    let bytes = build(template(), &[&key(1)]);
    let mut bundle = Bundle::parse(&bytes).unwrap();
    bundle.signatures[0].signature[10] ^= 0x80;
    let tampered = bundle.to_bytes();
    assert!(matches!(
        verifier().verify(&tampered),
        Err(VerifyError::SignatureInvalid { .. })
    ));
}

#[test]
fn flipped_bit_in_any_payload_byte_is_caught() {
    let bytes = build(template(), &[&key(1)]);
    let start = payload_offset(&bytes);
    // Every byte, not a sample: the payload is small and a miss anywhere would be a hole.
    for i in start..bytes.len() {
        let mut tampered = bytes.clone();
        tampered[i] ^= 0x04;
        let err = verifier().verify(&tampered).unwrap_err();
        assert!(
            matches!(err, VerifyError::ChunkDigestMismatch { .. }),
            "byte {i}: {err}"
        );
    }
}

#[test]
fn unknown_key_is_named() {
    let bytes = build(template(), &[&key(9)]);
    let err = verifier().verify(&bytes).unwrap_err();
    assert!(matches!(err, VerifyError::UnknownKey { .. }), "{err}");
    assert!(
        err.to_string().contains(&key(9).public().id().to_string()),
        "{err}"
    );
}

#[test]
fn unsigned_bundle_is_refused() {
    let bytes = build(template(), &[]);
    assert!(matches!(
        verifier().verify(&bytes),
        Err(VerifyError::Unsigned { .. })
    ));
}

#[test]
fn threshold_not_met() {
    let bytes = build(template(), &[&key(1)]);
    let v = Verifier::new(&[key(1).public(), key(2).public()], 2, NOW).unwrap();
    let err = v.verify(&bytes).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::ThresholdNotMet {
                valid: 1,
                required: 2,
                repeated: 0,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn same_key_counted_twice_does_not_meet_threshold() {
    let bytes = build(template(), &[&key(1)]);
    let mut bundle = Bundle::parse(&bytes).unwrap();
    let dup = bundle.signatures[0].clone();
    bundle.signatures.push(dup);
    let doubled = bundle.to_bytes();
    let v = Verifier::new(&[key(1).public(), key(2).public()], 2, NOW).unwrap();
    let err = v.verify(&doubled).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::ThresholdNotMet {
                valid: 1,
                required: 2,
                repeated: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("repeated"), "{err}");
}

#[test]
fn two_of_three_distinct_keys_meet_threshold() {
    let bytes = build(template(), &[&key(1), &key(3), &key(9)]);
    let v = Verifier::new(&[key(1).public(), key(2).public(), key(3).public()], 2, NOW).unwrap();
    let verified = v.verify(&bytes).unwrap();
    assert_eq!(verified.signed_by.len(), 2);
}

#[test]
fn duplicate_trusted_keys_do_not_inflate_the_key_set() {
    let err = Verifier::new(&[key(1).public(), key(1).public()], 2, NOW).unwrap_err();
    assert!(matches!(err, VerifyError::Config(_)), "{err}");
    assert!(matches!(
        Verifier::new(&[key(1).public()], 0, NOW),
        Err(VerifyError::Config(_))
    ));
}

#[test]
fn expired_bundle_is_refused() {
    let bytes = build(template(), &[&key(1)]);
    let late = Verifier::new(&[key(1).public()], 1, NOW + 1001).unwrap();
    assert!(matches!(
        late.verify(&bytes),
        Err(VerifyError::Expired { .. })
    ));
    let at_expiry = Verifier::new(&[key(1).public()], 1, NOW + 1000).unwrap();
    assert!(
        at_expiry.verify(&bytes).is_ok(),
        "valid through its expiry second"
    );
}

#[test]
fn sequence_not_above_floor_is_refused_for_equal_and_lower() {
    let bytes = build(template(), &[&key(1)]);
    for floor in [5, 6] {
        let err = verifier().sequence_floor(floor).verify(&bytes).unwrap_err();
        assert!(
            matches!(err, VerifyError::SequenceNotAboveFloor { sequence: 5, floor: f, .. } if f == floor),
            "{err}"
        );
    }
}

#[test]
fn absolute_parent_and_odd_paths_are_unsafe() {
    for path in [
        "/etc/passwd",
        "../escape",
        "a/../../b",
        "a//b",
        "./a",
        "c:\\x",
        "a\\b",
    ] {
        let bytes = forge_edited(|m| m.files[1].path = path.into());
        let err = verifier().verify(&bytes).unwrap_err();
        assert!(
            matches!(err, VerifyError::UnsafePath { .. }),
            "{path}: {err}"
        );
    }
}

#[test]
fn repeated_path_is_refused() {
    let bytes = forge_edited(|m| {
        let first = m.files[0].clone();
        m.files.push(first);
    });
    assert!(matches!(
        verifier().verify(&bytes),
        Err(VerifyError::DuplicatePath { .. })
    ));
}

#[test]
fn listed_file_missing_from_payload() {
    let bytes = forge_edited(|m| {
        m.files.push(FileEntry {
            path: "vocab.txt".into(),
            size: 3,
            sha256: Sha256Digest::of(b"abc"),
        })
    });
    let err = verifier().verify(&bytes).unwrap_err();
    assert!(
        matches!(&err, VerifyError::FileMissing { path, .. } if path == "vocab.txt"),
        "{err}"
    );
}

#[test]
fn unlisted_file_in_payload() {
    let bytes = forge_edited(|m| {
        m.files[1].path = "renamed.json".into();
        m.model.text.as_mut().unwrap().tokenizer = "renamed.json".into();
    });
    let err = verifier().verify(&bytes).unwrap_err();
    assert!(
        matches!(&err, VerifyError::UnlistedFile { path, .. } if path == "tokenizer.json"),
        "{err}"
    );
}

#[test]
fn listed_size_differs_from_payload_entry() {
    let bytes = forge_edited(|m| m.files[1].size += 1);
    let err = verifier().verify(&bytes).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::SizeMismatch {
                listed: 13,
                actual: 12,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn listed_hash_differs_from_payload_entry() {
    let bytes = forge_edited(|m| m.files[1].sha256 = Sha256Digest::of(b"other"));
    assert!(matches!(
        verifier().verify(&bytes),
        Err(VerifyError::FileDigestMismatch { .. })
    ));
}

#[test]
fn truncated_payload_and_extra_data() {
    let bytes = build(template(), &[&key(1)]);
    let err = verifier().verify(&bytes[..bytes.len() - 1]).unwrap_err();
    assert!(matches!(err, VerifyError::PayloadTruncated { .. }), "{err}");

    let mut extra = bytes.clone();
    extra.extend_from_slice(b"more");
    let err = verifier().verify(&extra).unwrap_err();
    assert!(
        matches!(err, VerifyError::TrailingData { extra: 4, .. }),
        "{err}"
    );
}

#[test]
fn every_truncation_of_the_header_is_a_container_error() {
    let bytes = build(template(), &[&key(1)]);
    let header = payload_offset(&bytes);
    for cut in 0..header {
        let err = verifier().verify(&bytes[..cut]).unwrap_err();
        assert!(
            matches!(err, VerifyError::Container(BundleError::Truncated { .. })),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn oversized_manifest_length_is_refused_before_reading() {
    let mut bytes = build(template(), &[&key(1)]);
    bytes[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
    let err = verifier().verify(&bytes).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::Container(BundleError::ManifestTooLarge { .. })
        ),
        "{err}"
    );
}

#[test]
fn malformed_cbor_manifest_is_a_decode_error_even_when_signed() {
    let payload = encode_payload(&files()).unwrap();
    for garbage in [&b"\xa1\x61"[..], b"not cbor at all", b"\x83\x01\x02\x03"] {
        let bytes = forge(garbage, &payload, &key(1));
        let err = verifier().verify(&bytes).unwrap_err();
        assert!(
            matches!(err, VerifyError::Container(BundleError::ManifestDecode(_))),
            "{err}"
        );
    }
}

#[test]
fn duplicate_cbor_keys_are_a_decode_error() {
    // A map {"name": "a", "name": "b"} merged into an otherwise valid manifest would let two
    // readers disagree; serde refuses duplicate fields.
    let bytes = build(template(), &[]);
    let manifest_bytes = Bundle::parse(&bytes).unwrap().manifest_bytes.to_vec();
    let value: serde_cbor::Value = serde_cbor::from_slice(&manifest_bytes).unwrap();
    let serde_cbor::Value::Map(map) = value else {
        panic!("manifest is a map")
    };
    // Re-encode by hand: a map header for one entry more, every pair, then "name" again.
    let mut raw = Vec::new();
    let len = map.len() + 1;
    assert!(len < 24, "small map header");
    raw.push(0xa0 | len as u8);
    for (k, v) in &map {
        raw.extend(serde_cbor::to_vec(k).unwrap());
        raw.extend(serde_cbor::to_vec(v).unwrap());
    }
    raw.extend(serde_cbor::to_vec(&"name").unwrap());
    raw.extend(serde_cbor::to_vec(&"other").unwrap());
    let forged = forge(&raw, Bundle::parse(&bytes).unwrap().payload, &key(1));
    let err = verifier().verify(&forged).unwrap_err();
    assert!(
        matches!(err, VerifyError::Container(BundleError::ManifestDecode(_))),
        "{err}"
    );
}

#[test]
fn bad_magic_and_container_version() {
    let mut bytes = build(template(), &[&key(1)]);
    bytes[0] = b'X';
    assert_eq!(
        verifier().verify(&bytes),
        Err(VerifyError::Container(BundleError::BadMagic))
    );
    let mut bytes = build(template(), &[&key(1)]);
    bytes[9] = 2;
    assert_eq!(
        verifier().verify(&bytes),
        Err(VerifyError::Container(BundleError::UnsupportedContainer(2)))
    );
}

#[test]
fn architecture_this_host_lacks() {
    let mut m = template();
    m.requirements.architectures = vec!["riscv64".into()];
    let bytes = build(m, &[&key(1)]);
    let err = verifier().host(host()).verify(&bytes).unwrap_err();
    assert!(
        matches!(err, VerifyError::ArchitectureUnsupported { .. }),
        "{err}"
    );
    assert!(
        verifier().verify(&bytes).is_ok(),
        "host checks only when a host is given"
    );
}

#[test]
fn backend_this_host_lacks() {
    let mut m = template();
    m.requirements.backends = vec![Backend::Ort];
    let bytes = build(m, &[&key(1)]);
    let err = verifier().host(host()).verify(&bytes).unwrap_err();
    assert!(matches!(err, VerifyError::NoUsableBackend { .. }), "{err}");
    assert!(
        err.to_string().contains("[ort]") && err.to_string().contains("[tract]"),
        "{err}"
    );
}

#[test]
fn accelerator_and_agent_version_requirements() {
    let mut m = template();
    m.requirements.accelerator = true;
    let bytes = build(m, &[&key(1)]);
    assert!(matches!(
        verifier().host(host()).verify(&bytes),
        Err(VerifyError::AcceleratorRequired { .. })
    ));

    let mut m = template();
    m.requirements.min_agent_version = Some(semver::Version::new(9, 0, 0));
    let bytes = build(m, &[&key(1)]);
    assert!(matches!(
        verifier().host(host()).verify(&bytes),
        Err(VerifyError::AgentTooOld { .. })
    ));
}

/// An edit applied to a valid manifest before re-signing it.
type Edit = Box<dyn FnOnce(&mut Manifest)>;

#[test]
fn inconsistent_manifests_are_invalid() {
    let cases: Vec<(&str, Edit)> = vec![
        (
            "chunk count",
            Box::new(|m| {
                m.chunks.pop();
            }),
        ),
        ("chunk size", Box::new(|m| m.chunk_size = 16)),
        (
            "model entry",
            Box::new(|m| m.model.entry = "absent.onnx".into()),
        ),
        (
            "tokenizer",
            Box::new(|m| m.model.text.as_mut().unwrap().tokenizer = "x.json".into()),
        ),
        ("labels", Box::new(|m| m.model.labels = vec!["a".into()])),
        ("name", Box::new(|m| m.name = "Bad Name".into())),
        (
            "created after expiry",
            Box::new(|m| m.created_at = m.expires_at + 1),
        ),
        ("text on raw", Box::new(|m| m.model.task = Task::Raw)),
        (
            "tolerance",
            Box::new(|m| m.self_tests[0].tolerance = f64::NAN),
        ),
    ];
    for (what, edit) in cases {
        let bytes = forge_edited(edit);
        let err = verifier().verify(&bytes).unwrap_err();
        assert!(
            matches!(err, VerifyError::InvalidManifest { .. }),
            "{what}: {err}"
        );
    }
    let bytes = forge_edited(|m| m.format_version = 2);
    assert!(matches!(
        verifier().verify(&bytes),
        Err(VerifyError::UnsupportedFormat { version: 2, .. })
    ));
}

#[test]
fn header_alone_verifies_before_any_payload_arrives() {
    let bytes = build(template(), &[&key(1)]);
    let header = &bytes[..payload_offset(&bytes)];
    let verified = verifier().verify_header(header).unwrap();
    assert!(
        verifier().verify(header).is_err(),
        "full verification needs the payload"
    );

    let payload = Bundle::parse(&bytes).unwrap().payload;
    let m = &verified.manifest;
    for index in 0..m.chunks.len() {
        let range = m.chunk_range(index).unwrap();
        let chunk = &payload[range.start as usize..range.end as usize];
        assert!(flotilla_shared::verify::chunk_is_valid(m, index, chunk));
        assert!(!flotilla_shared::verify::chunk_is_valid(
            m,
            index,
            &chunk[1..]
        ));
    }
    assert!(!flotilla_shared::verify::chunk_is_valid(
        m,
        m.chunks.len(),
        b""
    ));
}

#[test]
fn chunk_ranges_of_an_inconsistent_manifest_are_none_not_backwards() {
    let mut m = template();
    m.payload_size = 10;
    m.chunks = vec![Sha256Digest::of(b""); 3];
    assert_eq!(m.chunk_range(0), Some(0..10));
    assert_eq!(m.chunk_range(1), None);
    assert!(!flotilla_shared::verify::chunk_is_valid(&m, 1, b""));
    m.chunk_size = u32::MAX;
    assert_eq!(m.chunk_range(2), None);
}

#[test]
fn default_chunk_size_is_accepted() {
    let mut m = template();
    m.chunk_size = DEFAULT_CHUNK_SIZE;
    let bytes = build(m, &[&key(1)]);
    assert_eq!(verifier().verify(&bytes).unwrap().manifest.chunks.len(), 1);
}
