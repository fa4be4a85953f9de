//! The committed test models and the metadata the packer derives for them, shared by the
//! runtime and API tests.

#![allow(dead_code)] // Each test binary uses a different part of this helper.

use std::path::{Path, PathBuf};

use flotilla_agent::runtime::read_onnx_signature;
use flotilla_shared::manifest::{ModelMeta, Pooling, Task, TextMeta, Truncation};

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
