//! The committed test models and the metadata the packer derives for them, shared by the
//! runtime and API tests.

#![allow(dead_code)] // Each test binary uses a different part of this helper.

use std::path::{Path, PathBuf};

use flotilla_agent::runtime::read_onnx_signature;
use flotilla_shared::manifest::{ModelMeta, Pooling, Task, TextMeta, Truncation};
use flotilla_shared::tensor::{Tensor, TensorData};

/// The repository's `models/` folder.
pub fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

/// Metadata as the packer derives it for each committed model.
pub fn meta(model: &str, truncation: Truncation, max_sequence_length: u32) -> ModelMeta {
    let sig = read_onnx_signature(&models().join(model).join("model.onnx")).unwrap();
    let text = |output: &str, pooling, normalize| TextMeta {
        tokenizer: "tokenizer.json".into(),
        max_sequence_length,
        truncation,
        pooling,
        normalize,
        output: output.into(),
    };
    let (task, text, labels) = match model {
        "tiny-bert-embed" | "tiny-bert-selftest-fail" => (
            Task::Embedding,
            Some(text("last_hidden_state", Pooling::Mean, true)),
            vec![],
        ),
        "tiny-bert-classify" => (
            Task::Classification,
            Some(text("logits", Pooling::None, false)),
            vec!["negative".into(), "neutral".into(), "positive".into()],
        ),
        _ => (Task::Raw, None, vec![]),
    };
    ModelMeta {
        entry: "model.onnx".into(),
        opset: sig.opset,
        inputs: sig.inputs,
        outputs: sig.outputs,
        task,
        text,
        labels,
    }
}

/// The tiny BERT embedder's graph served as a raw model: token tensors in, hidden states out,
/// so a caller can send token ids its tokenizer would never produce.
pub fn raw_bert() -> (PathBuf, ModelMeta) {
    let meta = ModelMeta {
        task: Task::Raw,
        text: None,
        ..meta("tiny-bert-embed", Truncation::Truncate, 128)
    };
    (models().join("tiny-bert-embed"), meta)
}

/// A token id past the tiny BERT's vocabulary (1332 entries).
pub const PAST_VOCABULARY: i64 = 99_999;

/// One sequence of token ids as the tiny BERT's three inputs.
pub fn token_inputs(ids: &[i64]) -> Vec<Tensor> {
    let row = |name: &str, values: Vec<i64>| {
        Tensor::new(name, vec![1, ids.len()], TensorData::Int64(values)).unwrap()
    };
    vec![
        row("input_ids", ids.to_vec()),
        row("attention_mask", vec![1; ids.len()]),
        row("token_type_ids", vec![0; ids.len()]),
    ]
}
