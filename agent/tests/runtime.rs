//! The runtime on the committed test models: parity with onnxruntime, HuggingFace-exact
//! tokenisation, pooling, input validation and load failures.

use flotilla_agent::runtime::{read_onnx_signature, selftest, Model, RuntimeError};
use flotilla_shared::manifest::{Backend, ModelMeta, SelfTest, SelfTestInput, Truncation};
use flotilla_shared::tensor::{Tensor, TensorData};
use serde_json::Value;

#[path = "support/models.rs"]
mod models;
use models::{meta, models, raw_bert, token_inputs, PAST_VOCABULARY};

fn fixture(name: &str) -> Value {
    let text = std::fs::read_to_string(models().join("fixtures").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Metadata as the packer derives it, with the committed bundles' 128-token truncation.
fn meta128(model: &str) -> ModelMeta {
    meta(model, Truncation::Truncate, 128)
}

fn load(model: &str) -> Model {
    Model::load(&models().join(model), &meta128(model), Backend::Tract).unwrap()
}

fn tensor(v: &Value) -> Tensor {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn tract_matches_onnxruntime_on_every_reference_case() {
    let refs = fixture("reference_outputs.json");
    for (model_name, cases) in refs["models"].as_object().unwrap() {
        let model = load(model_name);
        for case in cases.as_array().unwrap() {
            let inputs = case["inputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(tensor)
                .collect();
            let outputs = model.infer(inputs).unwrap();
            for expected in case["outputs"].as_array().unwrap().iter().map(tensor) {
                let got = outputs.iter().find(|o| o.name == expected.name).unwrap();
                let diff = got.max_abs_diff(&expected).unwrap();
                assert!(diff < 1e-4, "{model_name}/{}: {diff}", case["name"]);
            }
        }
    }
}

#[test]
fn text_pipeline_matches_reference_postprocessing() {
    let refs = fixture("reference_outputs.json");
    for model_name in ["tiny-bert-embed", "tiny-bert-classify"] {
        let model = load(model_name);
        for case in refs["models"][model_name].as_array().unwrap() {
            if case.get("pair_texts").is_some() {
                continue; // sentence pairs go through raw tensors, checked above
            }
            let texts: Vec<String> = serde_json::from_value(case["texts"].clone()).unwrap();
            let got = model.run_texts(&texts).unwrap();
            let expected = tensor(&case["postprocessed"]);
            assert_eq!(got.name, expected.name);
            let diff = got.max_abs_diff(&expected).unwrap();
            assert!(diff < 1e-4, "{model_name}/{}: {diff}", case["name"]);
        }
    }
}

#[test]
fn tokenization_matches_huggingface_exactly_for_every_script() {
    let model = load("tiny-bert-embed");
    let text = model.text().unwrap();
    for case in fixture("tokenization.json").as_array().unwrap() {
        let input = case["text"].as_str().unwrap().to_owned();
        let batch = text.encode(std::slice::from_ref(&input)).unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let types: Vec<u32> = serde_json::from_value(case["type_ids"].clone()).unwrap();
        let tokens: Vec<String> = serde_json::from_value(case["tokens"].clone()).unwrap();
        assert_eq!(batch.ids[0], ids, "{input:?}");
        assert_eq!(batch.type_ids[0], types, "{input:?}");
        assert_eq!(batch.tokens[0], tokens, "{input:?}");
    }
}

#[test]
fn embeddings_are_unit_length_and_batch_independent() {
    let model = load("tiny-bert-embed");
    let texts = vec![
        "hello world".to_owned(),
        "今天天气很好，我们去公园散步吧".to_owned(),
    ];
    let together = model.run_texts(&texts).unwrap();
    assert_eq!(together.shape, vec![2, 32]);
    let TensorData::Fp32(values) = &together.data else {
        panic!("fp32")
    };
    for row in values.chunks(32) {
        let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }
    // Padding the short text in a batch must not change its embedding.
    let alone = model.run_texts(&texts[..1]).unwrap();
    let TensorData::Fp32(first) = &alone.data else {
        panic!("fp32")
    };
    let diff = first
        .iter()
        .zip(&values[..32])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn classifier_returns_probabilities_per_label() {
    let model = load("tiny-bert-classify");
    let out = model.run_texts(&["I love this".to_owned()]).unwrap();
    assert_eq!(out.name, "probabilities");
    assert_eq!(out.shape, vec![1, 3]);
    let TensorData::Fp32(p) = &out.data else {
        panic!("fp32")
    };
    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
}

#[test]
fn long_text_is_truncated_or_rejected_per_bundle() {
    let long = "hello ".repeat(300);
    let model = load("tiny-bert-embed");
    let batch = model
        .text()
        .unwrap()
        .encode(std::slice::from_ref(&long))
        .unwrap();
    assert_eq!(batch.ids[0].len(), 128);
    assert_eq!(*batch.ids[0].last().unwrap(), 3, "closing [SEP] is kept");
    assert!(batch.truncated[0]);
    assert!(model.run_texts(std::slice::from_ref(&long)).is_ok());

    let mut strict = meta128("tiny-bert-embed");
    strict.text.as_mut().unwrap().truncation = Truncation::Reject;
    let model = Model::load(&models().join("tiny-bert-embed"), &strict, Backend::Tract).unwrap();
    let err = model.run_texts(&["short".to_owned(), long]).unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::TextTooLong {
                index: 1,
                max: 128,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_client_error());
}

#[test]
fn bad_tensor_inputs_get_specific_client_errors() {
    let model = load("tiny-mlp-raw");
    let x =
        |name: &str, shape: Vec<usize>, data: TensorData| Tensor::new(name, shape, data).unwrap();
    let good = || x("x", vec![1, 4], TensorData::Fp32(vec![0.0; 4]));

    assert_eq!(model.infer(vec![good()]).unwrap()[0].shape, vec![1, 3]);
    let cases = [
        (
            vec![x("z", vec![1, 4], TensorData::Fp32(vec![0.0; 4]))],
            "unknown input \"z\"",
        ),
        (vec![], "missing input \"x\""),
        (
            vec![x("x", vec![1, 4], TensorData::Int64(vec![0; 4]))],
            "must be FP32, got INT64",
        ),
        (
            vec![x("x", vec![1, 5], TensorData::Fp32(vec![0.0; 5]))],
            "must have shape [batch, 4]",
        ),
        (vec![good(), good()], "more than once"),
    ];
    for (inputs, message) in cases {
        let err = model.infer(inputs).unwrap_err();
        assert!(err.is_client_error(), "{err}");
        assert!(
            err.to_string().contains(message),
            "{err} should mention {message}"
        );
    }
}

#[test]
fn a_tract_kernel_that_panics_on_an_input_fails_the_run_and_the_model_still_works() {
    // tract's Gather panics on an index past its table rather than failing.
    let (dir, meta) = raw_bert();
    let model = Model::load(&dir, &meta, Backend::Tract).unwrap();
    let err = model
        .infer(token_inputs(&[101, PAST_VOCABULARY, 102]))
        .unwrap_err();
    assert!(matches!(err, RuntimeError::Run(_)), "{err}");
    assert!(err.to_string().contains("tract panicked"), "{err}");
    assert!(
        err.to_string().contains("out of range"),
        "the panic's text: {err}"
    );
    let outputs = model.infer(token_inputs(&[101, 7, 102])).unwrap();
    assert_eq!(outputs[0].shape, vec![1, 3, 32]);
}

#[test]
fn inputs_sharing_a_symbol_must_agree() {
    let model = load("tiny-bert-embed");
    let ids = Tensor::new("input_ids", vec![1, 3], TensorData::Int64(vec![2, 5, 3])).unwrap();
    let mask = Tensor::new("attention_mask", vec![1, 2], TensorData::Int64(vec![1, 1])).unwrap();
    let types = Tensor::new("token_type_ids", vec![1, 3], TensorData::Int64(vec![0; 3])).unwrap();
    let err = model.infer(vec![ids, mask, types]).unwrap_err();
    assert!(
        matches!(err, RuntimeError::InconsistentDimension { .. }),
        "{err}"
    );
}

#[test]
fn broken_model_fails_to_load_with_the_reason() {
    let err = Model::load(
        &models().join("broken-load"),
        &meta128("broken-load"),
        Backend::Tract,
    )
    .unwrap_err();
    assert!(matches!(err, RuntimeError::LoadModel { .. }), "{err}");
    assert!(err.to_string().contains("FlotillaNoSuchOp"), "{err}");
}

#[test]
fn self_test_passes_on_its_own_output_and_fails_on_a_perturbed_model() {
    let texts = SelfTestInput::Texts(vec!["hello world".into()]);
    let good = load("tiny-bert-embed");
    let expected = selftest::compute(&good, &texts).unwrap();
    let test = SelfTest {
        name: "hello".into(),
        input: texts,
        expected,
        tolerance: 1e-4,
    };
    let outcome = selftest::run(&good, &test);
    assert!(outcome.passed(), "{outcome:?}");
    assert_eq!(outcome.max_abs_diff, 0.0);

    let perturbed = load("tiny-bert-selftest-fail");
    let outcome = selftest::run(&perturbed, &test);
    assert!(!outcome.passed());
    assert!(outcome.max_abs_diff > 1e-2, "{outcome:?}");
}

#[test]
fn signature_is_read_with_symbolic_dimensions() {
    let sig = read_onnx_signature(&models().join("tiny-bert-embed/model.onnx")).unwrap();
    assert_eq!(sig.opset, 14);
    let names: Vec<&str> = sig.inputs.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["input_ids", "attention_mask", "token_type_ids"]);
    assert_eq!(sig.inputs[0].shape_string(), "[batch, sequence]");
    assert_eq!(sig.outputs[0].shape_string(), "[batch, sequence, 32]");
}
