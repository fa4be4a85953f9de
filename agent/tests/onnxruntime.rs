//! The ONNX Runtime backend on the real library and the committed models: parity with tract
//! and with the Python reference outputs, provider detection, and load failures.

use flotilla_agent::runtime::{
    EngineInfo, GpuProviders, Model, Placement, Provider, RuntimeError, Target,
};
use flotilla_shared::manifest::{Backend, ModelMeta, Truncation};
use flotilla_shared::tensor::Tensor;
use serde_json::Value;

#[path = "support/models.rs"]
mod models;
#[path = "support/onnxruntime.rs"]
mod onnxruntime;
use models::{meta, models, raw_bert, token_inputs, PAST_VOCABULARY};

/// Outputs of the two backends may differ by float reassociation only.
const TOLERANCE: f64 = 1e-4;

/// Every committed model directory, by name.
fn model_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(models())
        .unwrap()
        .filter_map(|entry| {
            let path = entry.unwrap().path();
            path.join("model.onnx")
                .is_file()
                .then(|| path.file_name().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    assert!(names.len() >= 5, "models/ lost its test models: {names:?}");
    names
}

fn load(model: &str, meta: &ModelMeta, backend: Backend) -> Result<Model, RuntimeError> {
    Model::load(&models().join(model), meta, backend)
}

fn tensor(v: &Value) -> Tensor {
    serde_json::from_value(v.clone()).unwrap()
}

fn assert_close(what: &str, a: &[Tensor], b: &[Tensor]) {
    assert_eq!(a.len(), b.len(), "{what}: output count");
    for (a, b) in a.iter().zip(b) {
        assert_eq!(a.name, b.name, "{what}");
        assert_eq!(a.shape, b.shape, "{what}: {}", a.name);
        let diff = a.max_abs_diff(b).unwrap();
        assert!(diff < TOLERANCE, "{what}: {} differs by {diff}", a.name);
    }
}

/// Texts that exercise padding, CJK and truncation.
fn texts() -> Vec<String> {
    vec![
        "hello world".to_owned(),
        "今天天气很好，我们去公园散步吧".to_owned(),
        "I love machine learning!".to_owned(),
        "hello ".repeat(300),
    ]
}

#[test]
fn onnxruntime_and_tract_agree_on_every_committed_model() {
    if onnxruntime::runtime().is_none() {
        return;
    }
    let refs: Value = serde_json::from_str(
        &std::fs::read_to_string(models().join("fixtures/reference_outputs.json")).unwrap(),
    )
    .unwrap();
    let mut compared = 0;
    for name in model_names() {
        let meta = meta(&name, Truncation::Truncate, 128);
        let (ort, tract) = match (
            load(&name, &meta, Backend::Ort),
            load(&name, &meta, Backend::Tract),
        ) {
            (Ok(ort), Ok(tract)) => (ort, tract),
            (Err(ort), Err(tract)) => {
                // A model no backend can load must fail on both, with a load error.
                assert!(
                    matches!(ort, RuntimeError::LoadModel { .. }),
                    "{name}: {ort}"
                );
                assert!(
                    matches!(tract, RuntimeError::LoadModel { .. }),
                    "{name}: {tract}"
                );
                assert!(ort.to_string().contains("FlotillaNoSuchOp"), "{ort}");
                continue;
            }
            (ort, tract) => panic!("{name}: ort {:?}, tract {:?}", ort.err(), tract.err()),
        };
        assert_eq!(ort.info().backend, Backend::Ort);
        assert_eq!(ort.info().provider, "cpu");

        if let Some(cases) = refs["models"][&name].as_array() {
            for case in cases {
                let inputs: Vec<Tensor> = case["inputs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(tensor)
                    .collect();
                let from_ort = ort.infer(inputs.clone()).unwrap();
                let from_tract = tract.infer(inputs).unwrap();
                let what = format!("{name}/{}", case["name"]);
                assert_close(&what, &from_ort, &from_tract);
                let expected: Vec<Tensor> = case["outputs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(tensor)
                    .collect();
                for expected in expected {
                    let got = from_ort.iter().find(|o| o.name == expected.name).unwrap();
                    let diff = got.max_abs_diff(&expected).unwrap();
                    assert!(diff < TOLERANCE, "{what} vs python onnxruntime: {diff}");
                }
            }
        }
        if ort.text().is_some() {
            let from_ort = ort.run_texts(&texts()).unwrap();
            let from_tract = tract.run_texts(&texts()).unwrap();
            assert_close(&format!("{name}/texts"), &[from_ort], &[from_tract]);
        }
        compared += 1;
    }
    assert!(compared >= 4, "only {compared} models compared");
}

#[test]
fn minilm_agrees_on_both_backends_when_built() {
    let dir = models().join("minilm/out");
    if !dir.join("model.onnx").is_file() || onnxruntime::runtime().is_none() {
        return; // built by `.ci/run` after the tests; `python3 models/minilm/build.py` here
    }
    let sig = flotilla_agent::runtime::read_onnx_signature(&dir.join("model.onnx")).unwrap();
    let mut meta = meta("tiny-bert-embed", Truncation::Truncate, 128);
    meta.opset = sig.opset;
    meta.inputs = sig.inputs;
    meta.outputs = sig.outputs;
    let ort = Model::load(&dir, &meta, Backend::Ort).unwrap();
    let tract = Model::load(&dir, &meta, Backend::Tract).unwrap();
    let from_ort = ort.run_texts(&texts()).unwrap();
    let from_tract = tract.run_texts(&texts()).unwrap();
    assert_close("minilm", &[from_ort], &[from_tract]);
}

#[test]
fn cuda_asked_of_the_cpu_only_library_is_detected_and_reported_as_degraded_to_cpu() {
    let Some(runtime) = onnxruntime::runtime() else {
        return;
    };
    assert!(
        !runtime.has_provider(Provider::Cuda),
        "the PyPI onnxruntime wheel is CPU-only"
    );
    let both = [Backend::Ort, Backend::Tract];
    let placement = Placement {
        backends: both.to_vec(),
        gpu_providers: GpuProviders::Listed(vec![Provider::Cuda]),
        ort: Default::default(),
        host_gpu: false,
    };
    let targets = placement.targets(&both);
    assert_eq!(
        targets,
        [
            Target::Ort(Provider::Cuda),
            Target::Ort(Provider::Cpu),
            Target::Tract
        ]
    );

    let name = "tiny-bert-embed";
    let meta = meta(name, Truncation::Truncate, 128);
    let model = Model::load_on(&models().join(name), &meta, targets, &placement.ort).unwrap();
    assert_eq!(
        model.info(),
        EngineInfo {
            backend: Backend::Ort,
            provider: "cpu".into()
        },
        "the provider actually running is reported, not the one asked for"
    );
    let cause = model
        .degradation()
        .expect("running below the asked-for provider");
    assert!(cause.contains("ort/cuda"), "{cause}");
    assert!(cause.contains("CUDAExecutionProvider"), "{cause}");
    assert!(cause.ends_with("running on ort/cpu"), "{cause}");

    // It answers exactly as a model loaded on the CPU provider from the start.
    let plain = load(name, &meta, Backend::Ort).unwrap();
    assert!(plain.degradation().is_none());
    let diff = model
        .run_texts(&texts())
        .unwrap()
        .max_abs_diff(&plain.run_texts(&texts()).unwrap())
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn inputs_both_backends_fail_on_are_the_callers_fault_and_do_not_step_the_model_down() {
    if onnxruntime::runtime().is_none() {
        return;
    }
    let (dir, meta) = raw_bert();
    let targets = vec![Target::Ort(Provider::Cpu), Target::Tract];
    let model = Model::load_on(&dir, &meta, targets, &Default::default()).unwrap();

    let err = model
        .infer(token_inputs(&[101, PAST_VOCABULARY, 102]))
        .unwrap_err();
    assert!(err.is_client_error(), "answered 400, not 500: {err}");
    let message = err.to_string();
    assert!(
        message.contains("ort/cpu: ") && message.contains("indices element out of data bounds"),
        "onnxruntime's reason: {message}"
    );
    assert!(
        message.contains("tract: ") && message.contains("tract panicked"),
        "tract's reason: {message}"
    );
    assert_eq!(model.engines().active(), Target::Ort(Provider::Cpu));
    assert!(model.degradation().is_none(), "{:?}", model.degradation());

    let outputs = model.infer(token_inputs(&[101, 7, 102])).unwrap();
    assert_eq!(outputs[0].shape, vec![1, 3, 32]);
    assert_eq!(model.info().backend, Backend::Ort);
}

#[test]
fn automatic_gpu_providers_on_a_host_without_a_gpu_are_not_a_degradation() {
    if onnxruntime::runtime().is_none() {
        return;
    }
    let both = [Backend::Ort, Backend::Tract];
    let placement = Placement {
        host_gpu: false,
        ..Placement::new(both.to_vec())
    };
    assert_eq!(
        placement.targets(&both),
        [Target::Ort(Provider::Cpu), Target::Tract]
    );
    // A GPU host whose library lacks every GPU provider gets no GPU targets either.
    let gpu_host = Placement {
        host_gpu: true,
        ..placement
    };
    assert_eq!(
        gpu_host.targets(&both),
        [Target::Ort(Provider::Cpu), Target::Tract]
    );
}
