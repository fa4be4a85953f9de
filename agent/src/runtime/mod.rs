//! The inference runtime: load a bundle's model on a backend, validate inputs, run, post-process.
//!
//! Everything here is synchronous and CPU-bound; async callers run it on blocking threads. The
//! operator CLI uses the same code to compute self-test expectations when it packs a bundle, so
//! what a packer computes and what an agent checks come from one implementation.

mod fallback;
mod onnx_meta;
pub mod onnxruntime;
mod placement;
mod pool;
pub mod selftest;
pub mod text;
mod tract;

use std::path::{Path, PathBuf};

use flotilla_shared::manifest::{Backend, ModelMeta, Task};
use flotilla_shared::tensor::{DataType, Tensor, TensorSpec};

pub use fallback::{EngineLadder, EngineLoader, Target};
pub use onnx_meta::{read_onnx_signature, OnnxSignature};
pub use onnxruntime::{OrtRuntime, OrtSettings, Provider};
pub use placement::{plan, GpuProviders, Placement};
pub use pool::POOL_THREAD as CPU_POOL_THREAD;
pub use text::{TextBatch, TextPipeline};

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The ONNX file could not be read, parsed or optimised.
    #[error("cannot load model {path}: {reason}")]
    LoadModel {
        /// Model file.
        path: PathBuf,
        /// Engine's explanation.
        reason: String,
    },
    /// The tokenizer file could not be read or parsed.
    #[error("cannot load tokenizer {path}: {reason}")]
    LoadTokenizer {
        /// Tokenizer file.
        path: PathBuf,
        /// Parser's explanation.
        reason: String,
    },
    /// The model's signature does not fit its task.
    #[error("model does not fit its task: {0}")]
    Signature(String),
    /// The requested backend is not built into or available on this host.
    #[error("backend {0} is not available")]
    BackendUnavailable(Backend),
    /// The CPU thread pool tract and large tokenising run on could not be started.
    #[error("cannot start the CPU thread pool of {threads} threads: {reason}")]
    CpuPool {
        /// Threads asked for.
        threads: usize,
        /// What the operating system said.
        reason: String,
    },
    /// The ONNX Runtime library could not be found or started.
    #[error("onnxruntime is not available: {0}")]
    OrtUnavailable(String),
    /// An ONNX Runtime execution provider is missing from the library or failed to start.
    #[error("execution provider {provider} is not usable: {reason}")]
    ProviderUnavailable {
        /// The provider asked for.
        provider: Provider,
        /// What ONNX Runtime or the host said.
        reason: String,
    },
    /// A request names an input the model does not have.
    #[error("unknown input {name:?}; the model takes {expected}")]
    UnknownInput {
        /// Name given.
        name: String,
        /// Names the model takes, comma-separated.
        expected: String,
    },
    /// A request lacks one of the model's inputs.
    #[error("missing input {0:?}")]
    MissingInput(String),
    /// An input is given twice.
    #[error("input {0:?} is given more than once")]
    DuplicateInput(String),
    /// An input has the wrong datatype.
    #[error("input {name:?} must be {expected}, got {actual}")]
    InputDatatype {
        /// Input name.
        name: String,
        /// Declared datatype.
        expected: DataType,
        /// Given datatype.
        actual: DataType,
    },
    /// An input has a shape the model does not accept.
    #[error("input {name:?} must have shape {expected}, got {actual:?}")]
    InputShape {
        /// Input name.
        name: String,
        /// Declared shape.
        expected: String,
        /// Given shape.
        actual: Vec<usize>,
    },
    /// Inputs that share a symbolic dimension disagree on its size.
    #[error("inputs disagree on dimension {symbol:?}: {first} and {second}")]
    InconsistentDimension {
        /// Symbol name.
        symbol: String,
        /// Size seen first.
        first: usize,
        /// Conflicting size.
        second: usize,
    },
    /// A text exceeds the model's maximum length and the bundle says to reject it.
    #[error("text {index} has {tokens} tokens, the model takes at most {max}")]
    TextTooLong {
        /// Position in the batch.
        index: usize,
        /// Token count with special tokens.
        tokens: usize,
        /// Model maximum.
        max: usize,
    },
    /// Tokenisation failed.
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    /// No target was left to load the model on.
    #[error("no backend is available for this model")]
    NoTarget,
    /// The request holds no text or no rows.
    #[error("empty batch")]
    EmptyBatch,
    /// The engine failed while running.
    #[error("inference failed: {0}")]
    Run(String),
    /// Every engine of the model failed on these inputs (each engine's reason), so the inputs
    /// are at fault even though they passed validation.
    #[error("every engine of the model fails on these inputs: {0}")]
    InputRejected(String),
    /// The engine produced something the runtime cannot use.
    #[error("model output {name:?}: {reason}")]
    Output {
        /// Output name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// This operation needs a text model.
    #[error("model task is {0}, not a text task")]
    NotText(Task),
}

impl RuntimeError {
    /// Whether the caller's request is at fault (a client error) rather than the model or host.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Self::UnknownInput { .. }
                | Self::MissingInput(_)
                | Self::DuplicateInput(_)
                | Self::InputDatatype { .. }
                | Self::InputShape { .. }
                | Self::InconsistentDimension { .. }
                | Self::TextTooLong { .. }
                | Self::EmptyBatch
                | Self::NotText(_)
                | Self::InputRejected(_)
        )
    }
}

/// Which engine runs a model, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    /// The backend.
    pub backend: Backend,
    /// Execution provider actually in use, e.g. `cpu`.
    pub provider: String,
}

/// A model loaded on one backend. Inputs arrive validated and in the model's declared order.
pub trait Engine: Send + Sync {
    /// The backend and execution provider in use.
    fn info(&self) -> EngineInfo;

    /// Runs the model once. Outputs come back in the model's declared order.
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError>;
}

/// A loaded model with its metadata and, for text tasks, its tokenizer.
pub struct Model {
    meta: ModelMeta,
    engines: EngineLadder,
    text: Option<TextPipeline>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("task", &self.meta.task)
            .field("engine", &self.info())
            .finish()
    }
}

impl Model {
    /// Loads the model whose files lie under `dir` (paths as in the manifest) on `backend` only
    /// (ONNX Runtime on its CPU provider, from `ORT_DYLIB_PATH` unless already started).
    /// Optimisation happens here, once; this is slow and blocking.
    pub fn load(dir: &Path, meta: &ModelMeta, backend: Backend) -> Result<Self, RuntimeError> {
        let target = match backend {
            Backend::Tract => Target::Tract,
            Backend::Ort => Target::Ort(Provider::Cpu),
        };
        Self::load_on(dir, meta, vec![target], &OrtSettings::default())
    }

    /// Loads the model on the first of `targets` that loads, keeping the others to fall back
    /// to (see [`EngineLadder`]). Slow and blocking.
    pub fn load_on(
        dir: &Path,
        meta: &ModelMeta,
        targets: Vec<Target>,
        ort: &OrtSettings,
    ) -> Result<Self, RuntimeError> {
        let text = match &meta.text {
            Some(settings) => Some(TextPipeline::load(
                dir,
                meta,
                settings,
                ort.intra_op_threads,
            )?),
            None => None,
        };
        let (path, loader_meta, ort) = (dir.join(&meta.entry), meta.clone(), ort.clone());
        let loader: EngineLoader =
            Box::new(move |target| load_engine(target, &path, &loader_meta, &ort));
        Ok(Self {
            meta: meta.clone(),
            engines: EngineLadder::load(targets, loader)?,
            text,
        })
    }

    /// The metadata the model was loaded with.
    pub fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    /// Engine in use.
    pub fn info(&self) -> EngineInfo {
        self.engines.info()
    }

    /// The engines this model can run on, and which one it runs on now.
    pub fn engines(&self) -> &EngineLadder {
        &self.engines
    }

    /// Why the model is not on its best target, if it is not.
    pub fn degradation(&self) -> Option<String> {
        self.engines.degradation()
    }

    /// The tokenizer pipeline, for text models.
    pub fn text(&self) -> Option<&TextPipeline> {
        self.text.as_ref()
    }

    /// Runs raw tensors: checks names, datatypes and shapes, then runs in declared order.
    pub fn infer(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        let ordered = order_inputs(&self.meta.inputs, inputs)?;
        self.engines.run(ordered)
    }

    /// Runs texts through tokenizer, model and post-processing: `embeddings` [n, dim] for
    /// embedding models, `probabilities` [n, labels] for classifiers.
    pub fn run_texts(&self, texts: &[String]) -> Result<Tensor, RuntimeError> {
        let text = self
            .text
            .as_ref()
            .ok_or(RuntimeError::NotText(self.meta.task))?;
        let batch = text.encode(texts)?;
        let inputs = text.model_inputs(&batch, &self.meta.inputs)?;
        let outputs = self.engines.run(inputs)?;
        text.postprocess(&self.meta, &batch, outputs)
    }
}

/// Builds one engine for `target`.
fn load_engine(
    target: Target,
    path: &Path,
    meta: &ModelMeta,
    ort: &OrtSettings,
) -> Result<std::sync::Arc<dyn Engine>, RuntimeError> {
    Ok(match target {
        Target::Tract => {
            std::sync::Arc::new(tract::TractEngine::load(path, meta, ort.intra_op_threads)?)
        }
        Target::Ort(provider) => {
            let runtime = OrtRuntime::init(ort)?;
            std::sync::Arc::new(onnxruntime::OrtEngine::load(runtime, path, meta, provider)?)
        }
    })
}

/// Validates request tensors against the declared inputs and puts them in declared order.
fn order_inputs(specs: &[TensorSpec], inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
    let mut slots: Vec<Option<Tensor>> = specs.iter().map(|_| None).collect();
    for input in inputs {
        let Some(index) = specs.iter().position(|s| s.name == input.name) else {
            let expected = specs
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(RuntimeError::UnknownInput {
                name: input.name,
                expected,
            });
        };
        let spec = &specs[index];
        if input.datatype() != spec.datatype {
            let actual = input.datatype();
            return Err(RuntimeError::InputDatatype {
                name: input.name,
                expected: spec.datatype,
                actual,
            });
        }
        if !spec.admits_shape(&input.shape) {
            return Err(RuntimeError::InputShape {
                name: input.name,
                expected: spec.shape_string(),
                actual: input.shape,
            });
        }
        if slots[index].is_some() {
            return Err(RuntimeError::DuplicateInput(input.name));
        }
        slots[index] = Some(input);
    }

    let mut ordered = Vec::with_capacity(specs.len());
    for (spec, slot) in specs.iter().zip(slots) {
        ordered.push(slot.ok_or_else(|| RuntimeError::MissingInput(spec.name.clone()))?);
    }
    check_symbols(specs, &ordered)?;
    Ok(ordered)
}

/// Inputs that name the same symbolic dimension must agree on its size.
fn check_symbols(specs: &[TensorSpec], inputs: &[Tensor]) -> Result<(), RuntimeError> {
    let mut seen: Vec<(&str, usize)> = Vec::new();
    for (spec, input) in specs.iter().zip(inputs) {
        for (dim, size) in spec.shape.iter().zip(&input.shape) {
            let flotilla_shared::tensor::Dim::Symbol(symbol) = dim else {
                continue;
            };
            if symbol == "?" {
                continue;
            }
            match seen.iter().find(|(s, _)| s == symbol) {
                Some((_, first)) if first != size => {
                    return Err(RuntimeError::InconsistentDimension {
                        symbol: symbol.clone(),
                        first: *first,
                        second: *size,
                    })
                }
                Some(_) => {}
                None => seen.push((symbol, *size)),
            }
        }
    }
    Ok(())
}

/// Backends this process can run, in order of preference for CPU hosts: ONNX Runtime when its
/// library loads (from the agent's settings if it started ONNX Runtime already, else from
/// `ORT_DYLIB_PATH`), and tract always.
pub fn available_backends() -> Vec<Backend> {
    match OrtRuntime::init(&OrtSettings::default()) {
        Ok(_) => vec![Backend::Ort, Backend::Tract],
        Err(_) => vec![Backend::Tract],
    }
}
