//! Reads an ONNX file's signature (opset, inputs, outputs) without building an engine.

use std::path::Path;

use flotilla_shared::tensor::{DataType, Dim, TensorSpec};
use tract_onnx::pb;
use tract_onnx::prelude::Framework;

use super::RuntimeError;

/// What a graph declares about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxSignature {
    /// Default-domain opset.
    pub opset: u32,
    /// Graph inputs, initializers excluded.
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs.
    pub outputs: Vec<TensorSpec>,
}

/// Parses the protobuf at `path` and reads its declared signature. A graph that would fail to
/// optimise still parses here, so packing does not depend on a model being runnable.
pub fn read_onnx_signature(path: &Path) -> Result<OnnxSignature, RuntimeError> {
    let fail = |reason: String| RuntimeError::LoadModel {
        path: path.to_owned(),
        reason,
    };
    let proto = tract_onnx::onnx()
        .proto_model_for_path(path)
        .map_err(|e| fail(format!("{e:#}")))?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| fail("no graph".into()))?;

    let opset = proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .ok_or_else(|| fail("no default-domain opset import".into()))?;
    let opset = u32::try_from(opset).map_err(|_| fail(format!("opset {opset} out of range")))?;

    let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(&i.name.as_str()))
        .map(|i| value_spec(i).map_err(&fail))
        .collect::<Result<_, _>>()?;
    let outputs = graph
        .output
        .iter()
        .map(|o| value_spec(o).map_err(&fail))
        .collect::<Result<_, _>>()?;
    Ok(OnnxSignature {
        opset,
        inputs,
        outputs,
    })
}

fn value_spec(info: &pb::ValueInfoProto) -> Result<TensorSpec, String> {
    let Some(pb::type_proto::Value::TensorType(tensor)) =
        info.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(format!("{:?} is not a tensor", info.name));
    };
    let datatype = match tensor.elem_type {
        1 => DataType::Fp32,
        2 => DataType::Uint8,
        3 => DataType::Int8,
        6 => DataType::Int32,
        7 => DataType::Int64,
        8 => DataType::Bytes,
        9 => DataType::Bool,
        10 => DataType::Fp16,
        11 => DataType::Fp64,
        other => {
            return Err(format!(
                "{:?} has unsupported element type {other}",
                info.name
            ))
        }
    };
    let shape = tensor
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) if *n >= 0 => {
                        Dim::Fixed(*n as u64)
                    }
                    Some(pb::tensor_shape_proto::dimension::Value::DimParam(p))
                        if !p.is_empty() =>
                    {
                        Dim::Symbol(p.clone())
                    }
                    _ => Dim::Symbol("?".into()),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(TensorSpec {
        name: info.name.clone(),
        datatype,
        shape,
    })
}
