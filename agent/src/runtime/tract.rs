//! The tract backend: pure Rust, CPU only, always available.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;

use flotilla_shared::manifest::{Backend, ModelMeta};
use flotilla_shared::tensor::{Tensor as WireTensor, TensorData};
use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;

use super::{pool, Engine, EngineInfo, RuntimeError};

/// A model optimised by tract for the shapes its ONNX graph declares (symbolic dimensions stay
/// symbolic, so one optimised plan serves every batch size and sequence length).
pub struct TractEngine {
    plan: Arc<TypedRunnableModel>,
    /// Where tract splits large matrix products: the process's CPU pool.
    executor: Executor,
    /// For each declared input (manifest order), its position among the graph's inputs.
    input_order: Vec<usize>,
    /// Output names in graph order.
    output_names: Vec<String>,
}

impl TractEngine {
    /// Parses, optimises and plans the model at `path`, to run on the process's CPU pool of
    /// `threads` threads (0: one per core; see [`pool::shared`]).
    pub fn load(path: &Path, meta: &ModelMeta, threads: usize) -> Result<Self, RuntimeError> {
        let executor = pool::shared(threads)?;
        let fail = |e: TractError| RuntimeError::LoadModel {
            path: path.to_owned(),
            reason: format!("{e:#}"),
        };
        let model = tract_onnx::onnx().model_for_path(path).map_err(fail)?;

        let graph_inputs: Vec<String> = model
            .input_outlets()
            .map_err(fail)?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let mut input_order = Vec::with_capacity(meta.inputs.len());
        for spec in &meta.inputs {
            let Some(position) = graph_inputs.iter().position(|n| *n == spec.name) else {
                return Err(RuntimeError::Signature(format!(
                    "declared input {:?} is not a graph input ({})",
                    spec.name,
                    graph_inputs.join(", ")
                )));
            };
            input_order.push(position);
        }
        if input_order.len() != graph_inputs.len() {
            return Err(RuntimeError::Signature(format!(
                "the graph takes {} inputs, the manifest declares {}",
                graph_inputs.len(),
                input_order.len()
            )));
        }

        let typed = model.into_optimized().map_err(fail)?;
        let output_names = typed
            .output_outlets()
            .map_err(fail)?
            .iter()
            .map(|o| {
                typed
                    .outlet_label(*o)
                    .map(str::to_owned)
                    .unwrap_or_else(|| typed.node(o.node).name.clone())
            })
            .collect();
        let plan = typed.into_runnable().map_err(fail)?;
        Ok(Self {
            plan,
            executor,
            input_order,
            output_names,
        })
    }
}

impl Engine for TractEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            backend: Backend::Tract,
            provider: "cpu".into(),
        }
    }

    fn run(&self, inputs: Vec<WireTensor>) -> Result<Vec<WireTensor>, RuntimeError> {
        let mut graph_inputs: Vec<Option<TValue>> = vec![None; self.input_order.len()];
        for (tensor, position) in inputs.into_iter().zip(&self.input_order) {
            graph_inputs[*position] = Some(to_tract(tensor)?.into_tvalue());
        }
        let graph_inputs: TVec<TValue> = graph_inputs
            .into_iter()
            .map(|t| t.expect("invariant: order_inputs filled every declared input"))
            .collect();

        // Some of tract's kernels panic on inputs they cannot take (a Gather index past its
        // table) instead of failing. Each run has its own state, so the plan is sound after
        // one, and a panic is a failed run like any other.
        let run = || multithread_tract_scope(self.executor.clone(), || self.plan.run(graph_inputs));
        let outputs = std::panic::catch_unwind(AssertUnwindSafe(run))
            .map_err(|panic| {
                RuntimeError::Run(format!("tract panicked: {}", panic_message(&*panic)))
            })?
            .map_err(|e| RuntimeError::Run(format!("{e:#}")))?;
        outputs
            .iter()
            .zip(&self.output_names)
            .map(|(value, name)| from_tract(name, value))
            .collect()
    }
}

/// The text a panic was raised with.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("no message")
}

fn to_tract(t: WireTensor) -> Result<Tensor, RuntimeError> {
    let shape = t.shape.clone();
    let built = match t.data {
        TensorData::Bool(v) => Tensor::from_shape(&shape, &v),
        TensorData::Uint8(v) => Tensor::from_shape(&shape, &v),
        TensorData::Int8(v) => Tensor::from_shape(&shape, &v),
        TensorData::Int32(v) => Tensor::from_shape(&shape, &v),
        TensorData::Int64(v) => Tensor::from_shape(&shape, &v),
        TensorData::Fp16(v) => {
            let halves: Vec<f16> = v.into_iter().map(f16::from_f32).collect();
            Tensor::from_shape(&shape, &halves)
        }
        TensorData::Fp32(v) => Tensor::from_shape(&shape, &v),
        TensorData::Fp64(v) => Tensor::from_shape(&shape, &v),
        TensorData::Bytes(_) => {
            return Err(RuntimeError::Run(format!(
                "input {:?}: BYTES cannot feed the graph",
                t.name
            )))
        }
    };
    built.map_err(|e| RuntimeError::Run(format!("input {:?}: {e:#}", t.name)))
}

fn from_tract(name: &str, value: &TValue) -> Result<WireTensor, RuntimeError> {
    let out_err = |reason: String| RuntimeError::Output {
        name: name.to_owned(),
        reason,
    };
    fn values<T: Datum + Copy>(value: &TValue) -> TractResult<Vec<T>> {
        Ok(value.to_plain_array_view::<T>()?.iter().copied().collect())
    }
    let data = match value.datum_type() {
        DatumType::Bool => values::<bool>(value).map(TensorData::Bool),
        DatumType::U8 => values::<u8>(value).map(TensorData::Uint8),
        DatumType::I8 => values::<i8>(value).map(TensorData::Int8),
        DatumType::I32 => values::<i32>(value).map(TensorData::Int32),
        DatumType::I64 => values::<i64>(value).map(TensorData::Int64),
        DatumType::F16 => {
            values::<f16>(value).map(|v| TensorData::Fp16(v.into_iter().map(f16::to_f32).collect()))
        }
        DatumType::F32 => values::<f32>(value).map(TensorData::Fp32),
        DatumType::F64 => values::<f64>(value).map(TensorData::Fp64),
        other => return Err(out_err(format!("unsupported datatype {other:?}"))),
    }
    .map_err(|e| out_err(format!("{e:#}")))?;
    WireTensor::new(name, value.shape().to_vec(), data).map_err(|e| out_err(e.to_string()))
}
