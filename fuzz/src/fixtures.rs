//! Fixed keys, clock, host and manifest templates that every target and the seed generator share.
//!
//! Everything here is deterministic: a fuzz target must give the same answer for the same input
//! on every run, and the seed corpus must come out byte for byte the same on every machine.

use std::sync::OnceLock;

use flotilla_shared::manifest::{
    Backend, Manifest, ModelMeta, Pooling, Requirements, SelfTest, SelfTestInput, Task, TextMeta,
    Truncation, MANIFEST_FORMAT_VERSION, MIN_CHUNK_SIZE,
};
use flotilla_shared::tensor::{DataType, Dim, Tensor, TensorData, TensorSpec};
use flotilla_shared::{Bundle, BundleBuilder, HostProfile, SecretKey, Verifier};

/// The verifier's clock, Unix seconds.
pub const NOW: u64 = 1_800_000_000;

/// Seed of the one key the verifier trusts.
pub const TRUSTED_SEED: [u8; 32] = [1; 32];

/// Seed of a key the verifier does not trust, for bundles that also carry a stranger's signature.
pub const UNTRUSTED_SEED: [u8; 32] = [9; 32];

/// The sequence floor the verifier enforces; templates carry a sequence above it.
pub const SEQUENCE_FLOOR: u64 = 4;

/// Longest file the harness synthesises for a manifest entry, so a declared size of `u64::MAX`
/// costs a short payload rather than all of memory.
pub const MAX_SYNTHETIC_FILE: u64 = 64 * 1024;

// Deriving a key from its seed costs a scalar multiplication, a good share of one run's time
// under the fuzzer's instrumentation, so each key and the verifier are made once per process.
static TRUSTED_KEY: OnceLock<SecretKey> = OnceLock::new();
static UNTRUSTED_KEY: OnceLock<SecretKey> = OnceLock::new();
static VERIFIER: OnceLock<Verifier> = OnceLock::new();

/// The key whose signatures the verifier accepts.
pub fn trusted_key() -> &'static SecretKey {
    TRUSTED_KEY.get_or_init(|| SecretKey::from_seed(TRUSTED_SEED))
}

/// A key the verifier has never heard of.
pub fn untrusted_key() -> &'static SecretKey {
    UNTRUSTED_KEY.get_or_init(|| SecretKey::from_seed(UNTRUSTED_SEED))
}

/// The host every verifier checks against: x86_64 with tract, no accelerator, agent 0.3.0.
pub fn host() -> HostProfile {
    HostProfile {
        architecture: "x86_64".into(),
        backends: vec![Backend::Tract],
        accelerator: false,
        agent_version: semver::Version::new(0, 3, 0),
    }
}

/// A verifier with every check on: one trusted key, threshold 1, [`NOW`], the sequence floor and
/// the host requirements.
pub fn verifier() -> &'static Verifier {
    VERIFIER.get_or_init(|| {
        Verifier::new(&[trusted_key().public()], 1, NOW)
            .expect("invariant: threshold 1 over one trusted key is a valid configuration")
            .sequence_floor(SEQUENCE_FLOOR)
            .host(host())
    })
}

/// Contents the harness gives a payload file of `size` bytes: a fixed byte pattern, so a manifest
/// built from these files and a payload rebuilt from its file list agree without any hashing by
/// the fuzzer.
pub fn synthetic_contents(size: u64) -> Vec<u8> {
    (0..size.min(MAX_SYNTHETIC_FILE))
        .map(|i| (i % 251) as u8)
        .collect()
}

/// The payload files every template lists: an ONNX entry spanning several minimum-size chunks
/// and a small tokenizer.
pub fn template_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("model.onnx".into(), synthetic_contents(10_000)),
        ("tokenizer.json".into(), synthetic_contents(12)),
    ]
}

/// A valid embedding-model manifest with empty file and chunk lists, for [`BundleBuilder`].
pub fn embedding_template() -> Manifest {
    Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        name: "tiny-bert-embed".into(),
        version: semver::Version::new(1, 2, 0),
        sequence: SEQUENCE_FLOOR + 1,
        created_at: NOW - 100,
        expires_at: NOW + 1000,
        files: vec![],
        payload_size: 0,
        chunk_size: MIN_CHUNK_SIZE,
        chunks: vec![],
        model: ModelMeta {
            entry: "model.onnx".into(),
            opset: 14,
            inputs: vec![TensorSpec {
                name: "input_ids".into(),
                datatype: DataType::Int64,
                shape: vec![Dim::Symbol("batch".into()), Dim::Fixed(128)],
            }],
            outputs: vec![TensorSpec {
                name: "last_hidden_state".into(),
                datatype: DataType::Fp32,
                shape: vec![Dim::Symbol("batch".into()), Dim::Fixed(128), Dim::Fixed(2)],
            }],
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
            expected: vec![tensor(
                "embeddings",
                vec![1, 2],
                TensorData::Fp32(vec![0.6, 0.8]),
            )],
            tolerance: 1e-4,
        }],
    }
}

/// A valid classifier manifest: labels, reject-on-overflow truncation, CLS pooling.
pub fn classification_template() -> Manifest {
    let mut m = embedding_template();
    m.name = "sentiment_v2".into();
    m.model.task = Task::Classification;
    m.model.labels = vec!["negative".into(), "positive".into()];
    let text = m
        .model
        .text
        .as_mut()
        .expect("invariant: the embedding template carries text settings");
    text.truncation = Truncation::Reject;
    text.pooling = Pooling::Cls;
    text.output = "logits".into();
    m.self_tests[0].expected = vec![tensor(
        "probabilities",
        vec![1, 2],
        TensorData::Fp64(vec![0.25, 0.75]),
    )];
    m
}

/// A valid raw-tensor manifest: no text settings, tensor self-test input of several datatypes,
/// any architecture, a larger chunk size.
pub fn raw_template() -> Manifest {
    let mut m = embedding_template();
    m.name = "anomaly.detector-3".into();
    m.model.task = Task::Raw;
    m.model.text = None;
    m.chunk_size = 2 * MIN_CHUNK_SIZE;
    m.requirements.architectures = vec![];
    m.requirements.min_agent_version = None;
    m.self_tests = vec![SelfTest {
        name: "zeros".into(),
        input: SelfTestInput::Tensors(vec![
            tensor("x", vec![2, 2], TensorData::Int8(vec![0, -1, 2, 127])),
            tensor("mask", vec![3], TensorData::Bool(vec![true, false, true])),
            tensor("tag", vec![1], TensorData::Bytes(vec!["probe".into()])),
        ]),
        expected: vec![tensor("y", vec![1], TensorData::Int64(vec![i64::MAX]))],
        tolerance: 0.0,
    }];
    m
}

/// Every template with a short name, for seeds and tests.
pub fn templates() -> Vec<(&'static str, Manifest)> {
    vec![
        ("embedding", embedding_template()),
        ("classification", classification_template()),
        ("raw", raw_template()),
    ]
}

/// Builds `template` over [`template_files`] and returns the completed manifest and the bundle,
/// signed by the trusted key.
pub fn signed_bundle(template: Manifest) -> (Manifest, Vec<u8>) {
    let mut builder = BundleBuilder::new(template);
    for (path, data) in template_files() {
        builder = builder.file(path, data);
    }
    let (manifest, unsigned) = builder
        .build()
        .expect("invariant: the template file paths are framable");

    let mut bundle = Bundle::parse(&unsigned).expect("invariant: the builder frames correctly");
    bundle.add_signature(trusted_key());
    (manifest, bundle.to_bytes())
}

fn tensor(name: &str, shape: Vec<usize>, data: TensorData) -> Tensor {
    Tensor::new(name, shape, data).expect("invariant: fixture shapes match their values")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_builds_a_bundle_the_verifier_accepts() {
        for (name, template) in templates() {
            let (manifest, bytes) = signed_bundle(template);
            let verified = verifier()
                .verify(&bytes)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(verified.manifest, manifest, "{name}");
            assert_eq!(verified.signed_by, vec![trusted_key().public().id()]);
        }
    }

    #[test]
    fn synthetic_contents_are_capped() {
        assert_eq!(synthetic_contents(3), vec![0, 1, 2]);
        assert_eq!(
            synthetic_contents(u64::MAX).len() as u64,
            MAX_SYNTHETIC_FILE
        );
    }
}
