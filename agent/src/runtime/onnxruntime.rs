//! The ONNX Runtime backend: the shared library the host provides, loaded at run time; one
//! environment and one intra-op thread pool for the whole process; a session per model on the
//! execution provider asked for.
//!
//! ONNX Runtime quietly runs a model on the CPU when a requested provider cannot be registered.
//! This module never lets that happen unnoticed: a provider is asked for only when the library
//! lists it, and it is registered with `error_on_failure`, so a session either runs where it
//! says or fails to load with the reason.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use flotilla_shared::manifest::{Backend, ModelMeta};
use flotilla_shared::tensor::{Tensor as WireTensor, TensorData};
use ort::environment::{Environment, GlobalThreadPoolOptions};
use ort::ep::{self, ExecutionProvider as _};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use serde::Deserialize;

use super::{Engine, EngineInfo, RuntimeError};

/// Environment variable naming the ONNX Runtime shared library when the configuration does not.
pub const LIBRARY_ENV: &str = "ORT_DYLIB_PATH";

/// An ONNX Runtime execution provider the agent knows how to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// The default CPU provider; always present.
    Cpu,
    /// NVIDIA CUDA (the `onnxruntime-gpu` build).
    Cuda,
    /// NVIDIA TensorRT, on top of CUDA.
    TensorRt,
}

impl Provider {
    /// The short name reported in metadata, heartbeats and metrics: `cpu`, `cuda`, `tensorrt`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::TensorRt => "tensorrt",
        }
    }

    /// Whether the provider runs on a GPU.
    pub fn is_gpu(self) -> bool {
        !matches!(self, Self::Cpu)
    }

    /// ONNX Runtime's own name for it.
    fn ort_name(self) -> &'static str {
        match self {
            Self::Cpu => ep::CPU::NAME,
            Self::Cuda => ep::CUDA::NAME,
            Self::TensorRt => ep::TensorRT::NAME,
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the process-wide ONNX Runtime is set up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrtSettings {
    /// The shared library; `None` falls back to [`LIBRARY_ENV`].
    pub library: Option<PathBuf>,
    /// Threads in the one intra-op pool every session shares; 0 means one per core. The CPU
    /// pool (tract's products, tokenising) takes the same size, so that whichever backend a
    /// model lands on it gets the same thread budget.
    pub intra_op_threads: usize,
}

/// The loaded library and the one environment all sessions share.
#[derive(Debug)]
pub struct OrtRuntime {
    env: Environment,
    library: PathBuf,
}

static RUNTIME: OnceLock<OrtRuntime> = OnceLock::new();
/// Serialises start attempts; a failed one is not remembered, so a library installed later
/// is picked up by the next attempt.
static STARTING: Mutex<()> = Mutex::new(());

impl OrtRuntime {
    /// Loads the library and builds the environment. Once it has succeeded, later calls return
    /// that runtime whatever their settings (ONNX Runtime allows one environment per process).
    pub fn init(settings: &OrtSettings) -> Result<&'static OrtRuntime, RuntimeError> {
        if let Some(runtime) = RUNTIME.get() {
            return Ok(runtime);
        }
        let _starting = STARTING.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(runtime) = RUNTIME.get() {
            return Ok(runtime);
        }
        let runtime = Self::load(settings).map_err(RuntimeError::OrtUnavailable)?;
        Ok(RUNTIME.get_or_init(|| runtime))
    }

    /// The runtime if [`OrtRuntime::init`] succeeded earlier in this process.
    pub fn get() -> Option<&'static OrtRuntime> {
        RUNTIME.get()
    }

    /// The shared library in use.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// Whether the loaded library was built with `provider`.
    pub fn has_provider(&self, provider: Provider) -> bool {
        let listed = match provider {
            Provider::Cpu => return true,
            Provider::Cuda => ep::CUDA::is_available(),
            Provider::TensorRt => ep::TensorRT::is_available(),
        };
        listed.unwrap_or(false)
    }

    fn load(settings: &OrtSettings) -> Result<OrtRuntime, String> {
        let library = locate_library(settings)?;

        // Loading comes first: every other call into ort needs the library.
        let builder = ort::init_from(&library)
            .map_err(|e| format!("cannot load onnxruntime library: {e}"))?;
        // Edge hosts run other work too: no spinning threads burning idle CPU, and one pool of
        // a fixed size however many models are loaded.
        let pool = GlobalThreadPoolOptions::default()
            .with_intra_threads(settings.intra_op_threads)
            .and_then(|o| o.with_inter_threads(1))
            .and_then(|o| o.with_spin_control(false))
            .map_err(|e| format!("cannot configure the onnxruntime thread pool: {e}"))?;
        let env = builder
            .with_name("flotilla")
            .with_telemetry(false)
            .with_global_thread_pool(pool)
            .build()
            .map_err(|e| format!("cannot start onnxruntime: {e}"))?;
        Ok(OrtRuntime { env, library })
    }
}

/// Where the library is, from `settings` or `ORT_DYLIB_PATH`, without loading it.
pub fn locate_library(settings: &OrtSettings) -> Result<PathBuf, String> {
    let from_env = std::env::var_os(LIBRARY_ENV).map(PathBuf::from);
    resolve_library(settings.library.as_deref(), from_env.as_deref())
}

/// The configured library, else the environment's; checked to exist so that a missing file
/// is a plain message rather than a loader error.
fn resolve_library(configured: Option<&Path>, from_env: Option<&Path>) -> Result<PathBuf, String> {
    let from_env = from_env.filter(|p| !p.as_os_str().is_empty());
    let Some(library) = configured.or(from_env) else {
        return Err(format!(
            "no onnxruntime library configured (set inference.onnxruntime_library or \
             {LIBRARY_ENV})"
        ));
    };
    if !library.is_file() {
        return Err(format!(
            "onnxruntime library {} does not exist",
            library.display()
        ));
    }
    Ok(library.to_owned())
}

/// A model in an ONNX Runtime session on one execution provider.
pub struct OrtEngine {
    // `Session::run` takes `&mut self`; one run at a time per session, which the shared
    // intra-op pool would serialise anyway.
    session: Mutex<Session>,
    /// Declared input names, in manifest order.
    input_names: Vec<String>,
    /// Output names in graph order.
    output_names: Vec<String>,
    provider: Provider,
}

impl OrtEngine {
    /// Builds a session for the model at `path` on `provider`. Fails, rather than falling back
    /// to the CPU, when the provider is missing from the library or cannot be registered.
    pub fn load(
        runtime: &OrtRuntime,
        path: &Path,
        meta: &ModelMeta,
        provider: Provider,
    ) -> Result<Self, RuntimeError> {
        let fail = |reason: String| RuntimeError::LoadModel {
            path: path.to_owned(),
            reason,
        };
        let provider_fail = |reason: String| RuntimeError::ProviderUnavailable { provider, reason };
        if !runtime.has_provider(provider) {
            return Err(provider_fail(format!(
                "{} is not in the onnxruntime library {}",
                provider.ort_name(),
                runtime.library.display()
            )));
        }

        let mut builder = Session::builder(&runtime.env)
            .and_then(|b| {
                b.with_optimization_level(GraphOptimizationLevel::Level3)
                    .map_err(Into::into)
            })
            .and_then(|b| b.with_memory_pattern(true).map_err(Into::into))
            .map_err(|e: ort::Error| fail(e.to_string()))?;
        let dispatch = match provider {
            Provider::Cpu => None,
            Provider::Cuda => Some(ep::CUDA::default().build()),
            Provider::TensorRt => Some(ep::TensorRT::default().build()),
        };
        if let Some(dispatch) = dispatch {
            builder = builder
                .with_execution_providers([dispatch.error_on_failure()])
                .map_err(|e| provider_fail(e.to_string()))?;
        }
        let session = builder.commit_from_file(path).map_err(|e| {
            // A GPU provider that registered but cannot start (no device, no CUDA libraries)
            // fails here; say so as a provider problem so the caller can fall back.
            if provider.is_gpu() {
                provider_fail(e.to_string())
            } else {
                fail(e.to_string())
            }
        })?;

        let graph_inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        for spec in &meta.inputs {
            if !graph_inputs.contains(&spec.name.as_str()) {
                return Err(RuntimeError::Signature(format!(
                    "declared input {:?} is not a graph input ({})",
                    spec.name,
                    graph_inputs.join(", ")
                )));
            }
        }
        if graph_inputs.len() != meta.inputs.len() {
            return Err(RuntimeError::Signature(format!(
                "the graph takes {} inputs, the manifest declares {}",
                graph_inputs.len(),
                meta.inputs.len()
            )));
        }
        let output_names = session
            .outputs()
            .iter()
            .map(|o| o.name().to_owned())
            .collect();
        Ok(Self {
            input_names: meta.inputs.iter().map(|i| i.name.clone()).collect(),
            output_names,
            session: Mutex::new(session),
            provider,
        })
    }
}

impl Engine for OrtEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            backend: Backend::Ort,
            provider: self.provider.as_str().to_owned(),
        }
    }

    fn run(&self, inputs: Vec<WireTensor>) -> Result<Vec<WireTensor>, RuntimeError> {
        let mut values: Vec<(String, DynValue)> = Vec::with_capacity(inputs.len());
        for (tensor, name) in inputs.into_iter().zip(&self.input_names) {
            values.push((name.clone(), to_ort(tensor)?));
        }

        // A panic while holding the lock leaves the session itself intact.
        let mut session = self
            .session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let outputs = session
            .run(values)
            .map_err(|e| RuntimeError::Run(e.to_string()))?;
        self.output_names
            .iter()
            .map(|name| {
                let value = outputs.get(name).ok_or_else(|| RuntimeError::Output {
                    name: name.clone(),
                    reason: "not produced".into(),
                })?;
                from_ort(name, value)
            })
            .collect()
    }
}

fn to_ort(t: WireTensor) -> Result<DynValue, RuntimeError> {
    let shape = t.shape.clone();
    let name = t.name;
    let built = match t.data {
        TensorData::Bool(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
        TensorData::Uint8(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
        TensorData::Int8(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
        TensorData::Int32(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
        TensorData::Int64(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
        TensorData::Fp16(v) => {
            let halves: Vec<half::f16> = v.into_iter().map(half::f16::from_f32).collect();
            Tensor::from_array((shape, halves)).map(Tensor::into_dyn)
        }
        TensorData::Fp32(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
        TensorData::Fp64(v) => Tensor::from_array((shape, v)).map(Tensor::into_dyn),
        TensorData::Bytes(_) => {
            return Err(RuntimeError::Run(format!(
                "input {name:?}: BYTES cannot feed the graph"
            )))
        }
    };
    built.map_err(|e| RuntimeError::Run(format!("input {name:?}: {e}")))
}

fn from_ort(name: &str, value: &DynValue) -> Result<WireTensor, RuntimeError> {
    let out_err = |reason: String| RuntimeError::Output {
        name: name.to_owned(),
        reason,
    };
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(out_err(format!("{} is not a tensor", value.dtype())));
    };
    fn values<T: ort::value::PrimitiveTensorElementType + Copy>(
        value: &DynValue,
    ) -> ort::Result<(Vec<usize>, Vec<T>)> {
        let (shape, data) = value.try_extract_tensor::<T>()?;
        let shape = shape.iter().map(|d| *d as usize).collect();
        Ok((shape, data.to_vec()))
    }
    let (shape, data) = match ty {
        TensorElementType::Bool => values::<bool>(value).map(|(s, v)| (s, TensorData::Bool(v))),
        TensorElementType::Uint8 => values::<u8>(value).map(|(s, v)| (s, TensorData::Uint8(v))),
        TensorElementType::Int8 => values::<i8>(value).map(|(s, v)| (s, TensorData::Int8(v))),
        TensorElementType::Int32 => values::<i32>(value).map(|(s, v)| (s, TensorData::Int32(v))),
        TensorElementType::Int64 => values::<i64>(value).map(|(s, v)| (s, TensorData::Int64(v))),
        TensorElementType::Float16 => values::<half::f16>(value).map(|(s, v)| {
            (
                s,
                TensorData::Fp16(v.into_iter().map(half::f16::to_f32).collect()),
            )
        }),
        TensorElementType::Float32 => values::<f32>(value).map(|(s, v)| (s, TensorData::Fp32(v))),
        TensorElementType::Float64 => values::<f64>(value).map(|(s, v)| (s, TensorData::Fp64(v))),
        other => return Err(out_err(format!("unsupported datatype {other:?}"))),
    }
    .map_err(|e| out_err(e.to_string()))?;
    WireTensor::new(name, shape, data).map_err(|e| out_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_library_wins_over_the_environment_and_must_exist() {
        let here = Path::new(file!())
            .canonicalize()
            .unwrap_or_else(|_| PathBuf::from(file!()));
        let present = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        assert_eq!(
            resolve_library(Some(&present), Some(&here)).unwrap(),
            present
        );
        assert_eq!(resolve_library(None, Some(&present)).unwrap(), present);

        let missing = Path::new("/nonexistent/libonnxruntime.so");
        let err = resolve_library(Some(missing), Some(&present)).unwrap_err();
        assert!(
            err.contains("/nonexistent/libonnxruntime.so does not exist"),
            "{err}"
        );
        for env in [None, Some(Path::new(""))] {
            let err = resolve_library(None, env).unwrap_err();
            assert!(err.contains("ORT_DYLIB_PATH"), "{err}");
        }
    }
}
