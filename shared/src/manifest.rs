//! The bundle manifest: what a bundle contains, what it needs, and how to test it.
//!
//! The manifest is CBOR-encoded and signed as raw bytes; its SHA-256 is the bundle's digest.
//! Everything an agent needs to decide whether to install a bundle is here, so an agent can
//! fetch and check the manifest before it downloads a single payload byte.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;
use crate::tensor::{Tensor, TensorSpec};

/// The manifest layout this crate writes and the only one it reads.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;

/// The payload chunk size the packer uses by default: 128 KiB, one MQTT message per chunk.
pub const DEFAULT_CHUNK_SIZE: u32 = 128 * 1024;

/// Smallest chunk size a manifest may declare.
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;

/// Largest chunk size a manifest may declare; larger chunks would not fit common brokers.
pub const MAX_CHUNK_SIZE: u32 = 1024 * 1024;

/// Signed description of one release of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Layout version of this structure, [`MANIFEST_FORMAT_VERSION`].
    pub format_version: u32,
    /// Model name, `[a-z0-9][a-z0-9._-]*`, at most 64 characters.
    pub name: String,
    /// Semantic version of this release.
    pub version: semver::Version,
    /// Release counter; every release of a model must carry a larger one (anti-rollback).
    pub sequence: u64,
    /// Packing time, Unix seconds.
    pub created_at: u64,
    /// After this instant (Unix seconds) agents refuse the bundle.
    pub expires_at: u64,
    /// Every payload file, in payload order.
    pub files: Vec<FileEntry>,
    /// Total length of the payload section in bytes.
    pub payload_size: u64,
    /// Length of every payload chunk but the last.
    pub chunk_size: u32,
    /// SHA-256 of each payload chunk, in order.
    pub chunks: Vec<Sha256Digest>,
    /// What the model is and how to run it.
    pub model: ModelMeta,
    /// What a host must offer to run the model.
    pub requirements: Requirements,
    /// Known inputs and outputs an agent checks before it switches to the model.
    pub self_tests: Vec<SelfTest>,
}

impl Manifest {
    /// Looks up a payload file by path.
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }

    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// Number of chunks a payload of `payload_size` bytes splits into.
    pub fn expected_chunk_count(payload_size: u64, chunk_size: u32) -> u64 {
        payload_size.div_ceil(u64::from(chunk_size.max(1)))
    }

    /// Byte range of chunk `index` within the payload.
    pub fn chunk_range(&self, index: usize) -> Option<std::ops::Range<u64>> {
        if index >= self.chunks.len() {
            return None;
        }
        let start = (index as u64).checked_mul(u64::from(self.chunk_size))?;
        if start >= self.payload_size {
            // Only an inconsistent (unverified) manifest lists a chunk past the payload.
            return None;
        }
        let end = start
            .saturating_add(u64::from(self.chunk_size))
            .min(self.payload_size);
        Some(start..end)
    }
}

/// One file carried in the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative path with `/` separators; never absolute, never with `.` or `..` components.
    pub path: String,
    /// Length in bytes.
    pub size: u64,
    /// SHA-256 of the contents.
    pub sha256: Sha256Digest,
}

/// What a model does, which decides the endpoints an agent offers for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Tensors in, tensors out; served through the inference protocol only.
    Raw,
    /// Text in, one vector per text out.
    Embedding,
    /// Text in, a probability per label out.
    Classification,
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Raw => "raw",
            Self::Embedding => "embedding",
            Self::Classification => "classification",
        })
    }
}

/// Model signature and task metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    /// Payload path of the ONNX file to load.
    pub entry: String,
    /// Default-domain ONNX opset the graph imports.
    pub opset: u32,
    /// Graph inputs.
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs.
    pub outputs: Vec<TensorSpec>,
    /// What the model does.
    pub task: Task,
    /// Tokenisation and pooling, present exactly for text tasks.
    pub text: Option<TextMeta>,
    /// Class labels in output order; non-empty exactly for classification.
    pub labels: Vec<String>,
}

/// How text becomes model input and model output becomes an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextMeta {
    /// Payload path of the HuggingFace `tokenizer.json`.
    pub tokenizer: String,
    /// Longest token sequence the model accepts, special tokens included.
    pub max_sequence_length: u32,
    /// What happens to longer texts.
    pub truncation: Truncation,
    /// How token vectors become one vector (embedding task).
    pub pooling: Pooling,
    /// Whether embeddings are L2-normalised.
    pub normalize: bool,
    /// Model output that carries the result.
    pub output: String,
}

/// Policy for texts longer than the model's maximum sequence length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Keep the first tokens (and the closing special token) and go on.
    Truncate,
    /// Refuse the request with a client error.
    Reject,
}

/// How per-token vectors become one vector per text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Average over tokens the attention mask keeps.
    Mean,
    /// The first token's vector.
    Cls,
    /// The model output already has one vector per text.
    None,
}

/// An inference engine an agent may run a model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// tract, pure Rust, CPU.
    Tract,
    /// ONNX Runtime, CPU or accelerator.
    Ort,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tract => "tract",
            Self::Ort => "ort",
        })
    }
}

/// What a host must offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// Oldest agent able to run the bundle.
    pub min_agent_version: Option<semver::Version>,
    /// CPU architectures (`std::env::consts::ARCH` names); empty means any.
    pub architectures: Vec<String>,
    /// Engines able to run the model; at least one must be available on the host.
    pub backends: Vec<Backend>,
    /// Whether the model needs a GPU or other accelerator.
    pub accelerator: bool,
}

/// A known input and its expected output, checked before a model goes live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfTest {
    /// Short label used in reports.
    pub name: String,
    /// What goes in.
    pub input: SelfTestInput,
    /// What must come out; for text inputs one tensor named `embeddings` or `probabilities`.
    pub expected: Vec<Tensor>,
    /// Largest allowed absolute difference per element.
    pub tolerance: f64,
}

/// Self-test input: raw tensors, or texts that go through the bundle's text pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SelfTestInput {
    /// Graph inputs by name.
    Tensors(Vec<Tensor>),
    /// Texts for the tokenizer; exercises tokenisation, the model and pooling together.
    Texts(Vec<String>),
}

/// Name of the self-test output tensor for a text task.
pub fn text_output_name(task: Task) -> &'static str {
    match task {
        Task::Classification => "probabilities",
        Task::Embedding | Task::Raw => "embeddings",
    }
}
