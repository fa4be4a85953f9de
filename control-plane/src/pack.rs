//! `bundle.toml`, the packer's input, and packing a model directory into an unsigned bundle.
//!
//! The spec says what the operator knows (name, version, task, texts to self-test with); the
//! packer adds what it can work out: the graph's signature from the ONNX file, file hashes,
//! chunk hashes, and expected self-test outputs computed by running the model with tract.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use flotilla_agent::runtime::{read_onnx_signature, selftest, Model};
use flotilla_shared::manifest::{
    text_output_name, Backend, Manifest, ModelMeta, Pooling, Requirements, SelfTest, SelfTestInput,
    Task, TextMeta, Truncation, DEFAULT_CHUNK_SIZE, MANIFEST_FORMAT_VERSION,
};
use flotilla_shared::tensor::{Tensor, TensorSpec};
use flotilla_shared::verify::{check_manifest, check_model_name};
use flotilla_shared::{BundleBuilder, Sha256Digest};
use serde::Deserialize;

/// The spec file every model directory carries.
pub const SPEC_FILE: &str = "bundle.toml";

/// `bundle.toml`. Unknown fields are errors, so typos never silently change a release.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSpec {
    /// Model name, `[a-z0-9][a-z0-9._-]*`.
    pub name: String,
    /// Semantic version of this release.
    pub version: semver::Version,
    /// Release counter; must grow with every release of the model.
    pub sequence: u64,
    /// Days from packing until agents refuse the bundle. Default 365.
    #[serde(default = "default_valid_days")]
    pub valid_days: u32,
    /// Files to carry, relative to the model directory. Default: the entry ONNX file and, for
    /// text models, the tokenizer.
    pub files: Option<Vec<String>>,
    /// Transfer chunk size in bytes. Default 131072 (128 KiB).
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u32,
    /// The model.
    pub model: ModelSpec,
    /// What hosts must offer. Default: any architecture, tract or ONNX Runtime, no accelerator.
    #[serde(default)]
    pub requirements: RequirementsSpec,
    /// Known inputs checked by agents before activation.
    #[serde(default)]
    pub self_test: Vec<SelfTestSpec>,
}

fn default_valid_days() -> u32 {
    365
}

fn default_chunk_size() -> u32 {
    DEFAULT_CHUNK_SIZE
}

/// `[model]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// ONNX file to load, relative to the model directory.
    pub entry: String,
    /// `raw`, `embedding` or `classification`.
    pub task: Task,
    /// Class labels in output order (classification only).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Default-domain opset. Default: read from the ONNX file.
    pub opset: Option<u32>,
    /// Graph inputs. Default: read from the ONNX file.
    pub inputs: Option<Vec<TensorSpec>>,
    /// Graph outputs. Default: read from the ONNX file.
    pub outputs: Option<Vec<TensorSpec>>,
    /// Text settings; required for text tasks.
    pub text: Option<TextSpec>,
}

/// `[model.text]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSpec {
    /// HuggingFace `tokenizer.json`, relative to the model directory.
    pub tokenizer: String,
    /// Longest token sequence, special tokens included.
    pub max_sequence_length: u32,
    /// `truncate` (default) or `reject` texts that are longer.
    #[serde(default = "default_truncation")]
    pub truncation: Truncation,
    /// `mean`, `cls` or `none`. Default: `mean` for embedding, `none` for classification.
    pub pooling: Option<Pooling>,
    /// L2-normalise embeddings. Default: true for embedding, false for classification.
    pub normalize: Option<bool>,
    /// Model output holding the result. Default: the first output.
    pub output: Option<String>,
}

fn default_truncation() -> Truncation {
    Truncation::Truncate
}

/// `[requirements]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequirementsSpec {
    /// Oldest agent that may run the bundle. Default: none.
    pub min_agent_version: Option<semver::Version>,
    /// Allowed CPU architectures. Default: empty, meaning any.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Backends able to run the model. Default: `["tract", "ort"]`.
    #[serde(default = "default_backends")]
    pub backends: Vec<Backend>,
    /// Whether the model needs an accelerator. Default: false.
    #[serde(default)]
    pub accelerator: bool,
}

impl Default for RequirementsSpec {
    fn default() -> Self {
        Self {
            min_agent_version: None,
            architectures: Vec::new(),
            backends: default_backends(),
            accelerator: false,
        }
    }
}

fn default_backends() -> Vec<Backend> {
    vec![Backend::Tract, Backend::Ort]
}

/// `[[self_test]]`: texts for text models, tensors for raw ones.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfTestSpec {
    /// Short label.
    pub name: String,
    /// Texts to embed or classify.
    pub texts: Option<Vec<String>>,
    /// Graph inputs.
    pub inputs: Option<Vec<Tensor>>,
    /// Expected outputs. Default: computed by running the model with tract at packing time.
    pub expected: Option<Vec<Tensor>>,
    /// Largest allowed absolute difference per element. Default 1e-4.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
}

fn default_tolerance() -> f64 {
    1e-4
}

impl BundleSpec {
    /// Reads and parses `dir/bundle.toml`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(SPEC_FILE);
        let text = fs::read_to_string(&path)
            .with_context(|| format!("cannot read bundle spec {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid bundle spec {}", path.display()))
    }
}

/// What packing produced.
#[derive(Debug)]
pub struct Packed {
    /// The completed manifest.
    pub manifest: Manifest,
    /// Bundle digest.
    pub digest: Sha256Digest,
    /// Unsigned bundle bytes.
    pub bytes: Vec<u8>,
    /// Self-tests whose expected outputs were computed here.
    pub computed: Vec<String>,
}

/// Progress callbacks, so the CLI can show a bar without this module knowing about terminals.
pub trait Progress {
    /// A new step begins.
    fn step(&self, message: &str);
}

impl Progress for () {
    fn step(&self, _message: &str) {}
}

/// Rewrites the release lines of `dir/bundle.toml` in place: `version`, `sequence`, and the
/// model `name` when given. For making successive releases of one model directory.
pub fn set_release(dir: &Path, name: Option<&str>, version: &str, sequence: u64) -> Result<()> {
    let path = dir.join(SPEC_FILE);
    let spec = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    // Only top-level keys: self-tests have `name` fields too.
    let mut top_level = true;
    let rewritten: Vec<String> = spec
        .lines()
        .map(|line| {
            top_level &= !line.trim_start().starts_with('[');
            match (top_level, line.split_once(" = "), name) {
                (true, Some(("version", _)), _) => format!("version = {version:?}"),
                (true, Some(("sequence", _)), _) => format!("sequence = {sequence}"),
                (true, Some(("name", _)), Some(name)) => format!("name = {name:?}"),
                _ => line.to_owned(),
            }
        })
        .collect();
    std::fs::write(&path, rewritten.join("\n") + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Packs `dir` (which holds `bundle.toml`) at time `now` (Unix seconds).
pub fn pack(dir: &Path, now: u64, progress: &dyn Progress) -> Result<Packed> {
    progress.step("reading bundle.toml");
    let spec = BundleSpec::load(dir)?;
    let spec_path = dir.join(SPEC_FILE);
    let spec_err = |message: String| anyhow::anyhow!("{}: {message}", spec_path.display());
    check_model_name(&spec.name).map_err(spec_err)?;

    progress.step("reading the model signature");
    let entry = resolve(dir, &spec.model.entry)?;
    let meta = model_meta(&spec, &entry).map_err(|e| spec_err(format!("{e:#}")))?;

    let files = file_list(&spec);
    let mut contents = Vec::with_capacity(files.len());
    for path in &files {
        progress.step(&format!("hashing {path}"));
        let full = resolve(dir, path)?;
        let data = fs::read(&full).with_context(|| format!("cannot read {}", full.display()))?;
        contents.push((path.clone(), data));
    }

    let (self_tests, computed) = self_tests(dir, &spec, &meta, progress)?;

    let template = Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        name: spec.name.clone(),
        version: spec.version.clone(),
        sequence: spec.sequence,
        created_at: now,
        expires_at: now + u64::from(spec.valid_days) * 86_400,
        files: Vec::new(),
        payload_size: 0,
        chunk_size: spec.chunk_size,
        chunks: Vec::new(),
        model: meta,
        requirements: Requirements {
            min_agent_version: spec.requirements.min_agent_version.clone(),
            architectures: spec.requirements.architectures.clone(),
            backends: spec.requirements.backends.clone(),
            accelerator: spec.requirements.accelerator,
        },
        self_tests,
    };

    progress.step("chunking the payload");
    let mut builder = BundleBuilder::new(template);
    for (path, data) in contents {
        builder = builder.file(path, data);
    }
    let (manifest, bytes) = builder.build()?;
    let digest = flotilla_shared::Bundle::parse(&bytes)?.digest();
    // The verifier's format rules, applied before anything is written, so a packer never emits a
    // bundle every agent would refuse.
    check_manifest(&digest, &manifest).map_err(|e| spec_err(e.to_string()))?;
    Ok(Packed {
        manifest,
        digest,
        bytes,
        computed,
    })
}

/// Files to carry: as listed, or the entry plus the tokenizer. Duplicates are dropped.
fn file_list(spec: &BundleSpec) -> Vec<String> {
    let listed = spec.files.clone().unwrap_or_else(|| {
        let mut files = vec![spec.model.entry.clone()];
        files.extend(spec.model.text.as_ref().map(|t| t.tokenizer.clone()));
        files
    });
    let mut seen = BTreeSet::new();
    listed
        .into_iter()
        .filter(|f| seen.insert(f.clone()))
        .collect()
}

/// Resolves a spec path inside `dir`, refusing anything that could leave it.
fn resolve(dir: &Path, relative: &str) -> Result<PathBuf> {
    let path = Path::new(relative);
    let normal = path.components().all(|c| matches!(c, Component::Normal(_)));
    ensure!(
        normal && !relative.is_empty(),
        "{}: file {relative:?} must be a relative path without '.' or '..'",
        dir.join(SPEC_FILE).display()
    );
    let full = dir.join(path);
    let meta = fs::symlink_metadata(&full)
        .with_context(|| format!("listed file {} does not exist", full.display()))?;
    if !meta.is_file() {
        bail!(
            "listed file {} is not a regular file (symlinks are not packed)",
            full.display()
        );
    }
    Ok(full)
}

fn model_meta(spec: &BundleSpec, entry: &Path) -> Result<ModelMeta> {
    let m = &spec.model;
    // The graph is parsed only when the spec leaves part of the signature out; a spec that
    // declares everything (such as the deliberately broken test model) needs no parsable graph.
    let (opset, inputs, outputs) = match (m.opset, &m.inputs, &m.outputs) {
        (Some(opset), Some(inputs), Some(outputs)) => (opset, inputs.clone(), outputs.clone()),
        _ => {
            let graph = read_onnx_signature(entry)?;
            (
                m.opset.unwrap_or(graph.opset),
                m.inputs.clone().unwrap_or(graph.inputs),
                m.outputs.clone().unwrap_or(graph.outputs),
            )
        }
    };
    ensure!(!outputs.is_empty(), "the model declares no outputs");

    let text = match (&m.text, m.task) {
        (None, Task::Raw) => None,
        (Some(_), Task::Raw) => bail!("[model.text] is only for embedding and classification"),
        (None, task) => bail!("task {task} needs a [model.text] section"),
        (Some(t), task) => {
            let is_embedding = task == Task::Embedding;
            let default_pooling = if is_embedding {
                Pooling::Mean
            } else {
                Pooling::None
            };
            Some(TextMeta {
                tokenizer: t.tokenizer.clone(),
                max_sequence_length: t.max_sequence_length,
                truncation: t.truncation,
                pooling: t.pooling.unwrap_or(default_pooling),
                normalize: t.normalize.unwrap_or(is_embedding),
                output: t.output.clone().unwrap_or_else(|| outputs[0].name.clone()),
            })
        }
    };
    Ok(ModelMeta {
        entry: m.entry.clone(),
        opset,
        inputs,
        outputs,
        task: m.task,
        text,
        labels: m.labels.clone(),
    })
}

/// Builds the manifest's self-tests, running the model only if some expectation is missing.
fn self_tests(
    dir: &Path,
    spec: &BundleSpec,
    meta: &ModelMeta,
    progress: &dyn Progress,
) -> Result<(Vec<SelfTest>, Vec<String>)> {
    let spec_path = dir.join(SPEC_FILE);
    let mut model: Option<Model> = None;
    let mut tests = Vec::with_capacity(spec.self_test.len());
    let mut computed = Vec::new();

    for t in &spec.self_test {
        let what = format!("{}: self-test {:?}", spec_path.display(), t.name);
        let input = match (&t.texts, &t.inputs) {
            (Some(texts), None) if meta.task != Task::Raw => SelfTestInput::Texts(texts.clone()),
            (None, Some(inputs)) => SelfTestInput::Tensors(inputs.clone()),
            (Some(_), None) => bail!("{what}: texts need a text task; give inputs instead"),
            _ => bail!("{what}: give exactly one of texts or inputs"),
        };
        if let Some(expected) = &t.expected {
            if let SelfTestInput::Texts(_) = input {
                let wanted = text_output_name(meta.task);
                ensure!(
                    expected.len() == 1 && expected[0].name == wanted,
                    "{what}: a text self-test expects one tensor named {wanted:?}"
                );
            }
        }

        let expected = match &t.expected {
            Some(expected) => expected.clone(),
            None => {
                if model.is_none() {
                    progress.step("loading the model to compute self-test outputs");
                    let loaded = Model::load(dir, meta, Backend::Tract).with_context(|| {
                        format!("{what} has no expected outputs, and the model cannot run to compute them")
                    })?;
                    model = Some(loaded);
                }
                let model = model.as_ref().expect("invariant: loaded just above");
                progress.step(&format!("running self-test {}", t.name));
                computed.push(t.name.clone());
                selftest::compute(model, &input)
                    .with_context(|| format!("{what}: the model failed"))?
            }
        };
        tests.push(SelfTest {
            name: t.name.clone(),
            input,
            expected,
            tolerance: t.tolerance,
        });
    }
    Ok((tests, computed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
    }

    #[test]
    fn every_committed_model_packs() {
        for model in [
            "tiny-bert-embed",
            "tiny-bert-classify",
            "tiny-bert-selftest-fail",
            "broken-load",
            "tiny-mlp-raw",
        ] {
            let packed = pack(&models().join(model), 1_800_000_000, &()).unwrap();
            assert_eq!(packed.manifest.name, model);
            assert!(!packed.manifest.self_tests.is_empty(), "{model}");
        }
    }

    #[test]
    fn expected_outputs_are_computed_only_when_missing() {
        let embed = pack(&models().join("tiny-bert-embed"), 0, &()).unwrap();
        assert_eq!(embed.computed.len(), embed.manifest.self_tests.len());
        let first = &embed.manifest.self_tests[0].expected[0];
        assert_eq!(first.name, "embeddings");
        assert_eq!(first.shape, vec![2, 32]);

        // broken-load gives its expectations, so packing never runs the unloadable model.
        let broken = pack(&models().join("broken-load"), 0, &()).unwrap();
        assert!(broken.computed.is_empty());
    }

    #[test]
    fn packing_is_deterministic_for_a_fixed_time() {
        let a = pack(&models().join("tiny-mlp-raw"), 42, &()).unwrap();
        let b = pack(&models().join("tiny-mlp-raw"), 42, &()).unwrap();
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.bytes, b.bytes);
        assert_eq!(a.manifest.expires_at, 42 + 365 * 86_400);
    }

    fn spec_dir(spec: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::copy(
            models().join("tiny-mlp-raw/model.onnx"),
            dir.path().join("model.onnx"),
        )
        .unwrap();
        fs::write(dir.path().join(SPEC_FILE), spec).unwrap();
        dir
    }

    const RAW: &str = "name = \"m\"\nversion = \"1.0.0\"\nsequence = 1\n[model]\nentry = \"model.onnx\"\ntask = \"raw\"\n";

    #[test]
    fn bad_specs_get_errors_naming_the_file_and_the_problem() {
        let cases = [
            (
                format!("{RAW}colour = \"blue\"\n"),
                "unknown field `colour`",
            ),
            (
                RAW.replace("name = \"m\"", "name = \"Bad Name\""),
                "must match",
            ),
            (RAW.replace("model.onnx", "missing.onnx"), "does not exist"),
            (
                RAW.replace("model.onnx", "../model.onnx"),
                "without '.' or '..'",
            ),
            (
                RAW.replace("\"raw\"", "\"embedding\""),
                "needs a [model.text] section",
            ),
            (RAW.replace("1.0.0", "one"), "invalid bundle spec"),
            (
                format!("{RAW}[[self_test]]\nname = \"t\"\ntexts = [\"hi\"]\n"),
                "texts need a text task",
            ),
            (
                format!("{RAW}[[self_test]]\nname = \"t\"\n"),
                "exactly one of texts or inputs",
            ),
        ];
        for (spec, message) in cases {
            let dir = spec_dir(&spec);
            let err = format!("{:#}", pack(dir.path(), 0, &()).unwrap_err());
            assert!(err.contains(message), "{err} should mention {message}");
            assert!(
                err.contains(dir.path().to_str().unwrap()),
                "{err} should name the file"
            );
        }
    }

    #[test]
    fn missing_spec_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", pack(dir.path(), 0, &()).unwrap_err());
        assert!(
            err.contains("cannot read bundle spec") && err.contains("bundle.toml"),
            "{err}"
        );
    }

    #[test]
    fn self_test_input_errors_surface_at_packing() {
        let spec = format!(
            "{RAW}[[self_test]]\nname = \"t\"\n[[self_test.inputs]]\nname = \"x\"\ndatatype = \"FP32\"\nshape = [1, 5]\ndata = [1, 2, 3, 4, 5]\n"
        );
        let dir = spec_dir(&spec);
        let err = format!("{:#}", pack(dir.path(), 0, &()).unwrap_err());
        assert!(
            err.contains("self-test \"t\"") && err.contains("must have shape [batch, 4]"),
            "{err}"
        );
    }
}
