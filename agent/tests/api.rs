//! The local HTTP API on the real router with the committed test models: every endpoint's
//! answers checked against the runtime, every bad input's status and JSON error, limits,
//! concurrency, the atomic switch, metrics, and replayed `tritonclient` requests.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use base64::Engine as _;
use bytes::Bytes;
use flotilla_agent::api::{router, ApiState};
use flotilla_agent::config::{ApiConfig, BatchingConfig};
use flotilla_agent::metrics::Metrics;
use flotilla_agent::runtime::Model;
use flotilla_agent::serving::{ModelSlot, ServedModel};
use flotilla_shared::manifest::{Backend, Manifest, Requirements, Truncation};
use flotilla_shared::tensor::{Tensor, TensorData};
use flotilla_shared::Sha256Digest;
use serde_json::{json, Value};
use tower::ServiceExt as _;

#[path = "support/models.rs"]
mod models;
use models::{meta, models};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A loaded model as the agent serves it, under `name@version`.
fn served_with(
    model: &str,
    version: &str,
    truncation: Truncation,
    max_len: u32,
) -> Arc<ServedModel> {
    let meta = meta(model, truncation, max_len);
    let loaded = Model::load(&models().join(model), &meta, Backend::Tract).unwrap();
    let manifest = Manifest {
        format_version: 1,
        name: model.to_owned(),
        version: version.parse().unwrap(),
        sequence: 1,
        created_at: 0,
        expires_at: u64::MAX,
        files: vec![],
        payload_size: 0,
        chunk_size: 4096,
        chunks: vec![],
        model: meta,
        requirements: Requirements {
            min_agent_version: None,
            architectures: vec![],
            backends: vec![Backend::Tract],
            accelerator: false,
        },
        self_tests: vec![],
    };
    Arc::new(ServedModel {
        model: loaded,
        manifest,
        digest: Sha256Digest::of(format!("{model}@{version}").as_bytes()),
        load_time: Duration::from_millis(42),
    })
}

fn served(model: &str) -> Arc<ServedModel> {
    served_with(model, "1.0.0", Truncation::Truncate, 128)
}

/// The router on a slot, with the slot and metrics kept for inspection.
struct Harness {
    slot: Arc<ModelSlot>,
    metrics: Arc<Metrics>,
    state: ApiState,
    app: Router,
}

impl Harness {
    fn empty(config: ApiConfig, max_concurrency: usize) -> Self {
        let slot = Arc::new(ModelSlot::new(max_concurrency));
        let metrics = Arc::new(Metrics::new());
        let state = ApiState::new(slot.clone(), metrics.clone(), config);
        let app = router(state.clone());
        Self {
            slot,
            metrics,
            state,
            app,
        }
    }

    fn serving(model: &str) -> Self {
        let harness = Self::empty(ApiConfig::default(), 4);
        harness.slot.activate(served(model));
        harness
    }

    async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, uri: &str) -> Reply {
        self.send(Request::get(uri).body(Body::empty()).unwrap())
            .await
    }

    async fn post(&self, uri: &str, body: Value) -> Reply {
        self.post_raw(uri, body.to_string()).await
    }

    async fn post_raw(&self, uri: &str, body: impl Into<Body>) -> Reply {
        let request = Request::post(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.into())
            .unwrap();
        self.send(request).await
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts an error reply: the status, a JSON `{"error"}` body, and a phrase in it.
    fn assert_error(&self, status: StatusCode, phrase: &str) {
        let body = self.json();
        assert_eq!(self.status, status, "{body}");
        let message = body["error"].as_str().unwrap_or_else(|| panic!("{body}"));
        assert!(
            message.contains(phrase),
            "{message:?} should mention {phrase:?}"
        );
        let content_type = self.headers[header::CONTENT_TYPE].to_str().unwrap();
        assert_eq!(content_type, "application/json");
    }

    fn header_ms(&self, name: &str) -> f64 {
        let value = self
            .headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"));
        value.to_str().unwrap().parse().unwrap()
    }
}

fn fp32(tensor: &Tensor) -> &[f32] {
    let TensorData::Fp32(values) = &tensor.data else {
        panic!("{} is not FP32", tensor.name)
    };
    values
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn assert_close(got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len());
    let diff = got
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-6, "max difference {diff}");
}

fn texts(values: &[&str]) -> Vec<String> {
    values.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn health_reports_live_always_and_ready_only_with_a_model() {
    let harness = Harness::empty(ApiConfig::default(), 2);

    let live = harness.get("/v2/health/live").await;
    assert_eq!(live.status, StatusCode::OK);
    assert_eq!(live.json(), json!({ "live": true }));
    harness
        .get("/v2/health/ready")
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "no model");

    let server = harness.get("/v2").await;
    assert_eq!(server.status, StatusCode::OK);
    let server = server.json();
    assert_eq!(server["name"], "flotilla");
    assert_eq!(server["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(server["extensions"], json!(["binary_tensor_data"]));

    harness.slot.activate(served("tiny-mlp-raw"));
    let ready = harness.get("/v2/health/ready").await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json(), json!({ "ready": true }));
}

#[tokio::test]
async fn every_model_endpoint_answers_503_before_a_model_is_loaded() {
    let harness = Harness::empty(ApiConfig::default(), 2);
    for uri in ["/v2/models/tiny-mlp-raw", "/v2/models/tiny-mlp-raw/ready"] {
        harness
            .get(uri)
            .await
            .assert_error(StatusCode::SERVICE_UNAVAILABLE, "no model is loaded yet");
    }
    let x = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]});
    let posts = [
        ("/v2/models/tiny-mlp-raw/infer", x),
        ("/v1/embed", json!({"inputs": "hi"})),
        ("/v1/classify", json!({"inputs": "hi"})),
        ("/v1/tokenize", json!({"text": "hi"})),
        ("/v1/embeddings", json!({"model": "m", "input": "hi"})),
    ];
    for (uri, body) in posts {
        harness
            .post(uri, body)
            .await
            .assert_error(StatusCode::SERVICE_UNAVAILABLE, "no model is loaded yet");
    }
}

#[tokio::test]
async fn raw_model_metadata_lists_graph_tensors_with_symbolic_dims_as_minus_one() {
    let harness = Harness::serving("tiny-mlp-raw");
    for uri in [
        "/v2/models/tiny-mlp-raw",
        "/v2/models/tiny-mlp-raw/versions/1.0.0",
    ] {
        let reply = harness.get(uri).await;
        assert_eq!(reply.status, StatusCode::OK);
        let body = reply.json();
        assert_eq!(body["name"], "tiny-mlp-raw");
        assert_eq!(body["versions"], json!(["1.0.0"]));
        assert_eq!(body["platform"], "onnx");
        assert_eq!(
            body["inputs"],
            json!([{"name": "x", "datatype": "FP32", "shape": [-1, 4]}])
        );
        assert_eq!(
            body["outputs"],
            json!([{"name": "y", "datatype": "FP32", "shape": [-1, 3]}])
        );
        assert_eq!(body["parameters"]["task"], "raw");
        assert_eq!(body["parameters"]["backend"], "tract");
    }
    for uri in [
        "/v2/models/tiny-mlp-raw/ready",
        "/v2/models/tiny-mlp-raw/versions/1.0.0/ready",
    ] {
        let reply = harness.get(uri).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json(), json!({"name": "tiny-mlp-raw", "ready": true}));
    }
}

#[tokio::test]
async fn unknown_model_names_and_versions_are_404_everywhere() {
    let harness = Harness::serving("tiny-mlp-raw");
    for uri in [
        "/v2/models/other",
        "/v2/models/other/ready",
        "/v2/models/tiny-mlp-raw/versions/9.9.9",
        "/v2/models/tiny-mlp-raw/versions/9.9.9/ready",
    ] {
        let reply = harness.get(uri).await;
        reply.assert_error(StatusCode::NOT_FOUND, "tiny-mlp-raw");
    }
    let x = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]});
    harness
        .post("/v2/models/other/infer", x.clone())
        .await
        .assert_error(StatusCode::NOT_FOUND, "\"other\" is not served here");
    harness
        .post("/v2/models/tiny-mlp-raw/versions/2.0.0/infer", x)
        .await
        .assert_error(StatusCode::NOT_FOUND, "no version \"2.0.0\"");
}

#[tokio::test]
async fn text_model_metadata_advertises_text_in_and_the_task_tensor_out() {
    for (model, output, width) in [
        ("tiny-bert-embed", "embeddings", 32),
        ("tiny-bert-classify", "probabilities", 3),
    ] {
        let harness = Harness::serving(model);
        let body = harness.get(&format!("/v2/models/{model}")).await.json();
        assert_eq!(
            body["inputs"],
            json!([{"name": "text", "datatype": "BYTES", "shape": [-1]}])
        );
        assert_eq!(
            body["outputs"],
            json!([{"name": output, "datatype": "FP32", "shape": [-1, width]}])
        );
    }
}

#[tokio::test]
async fn raw_inference_returns_what_the_model_computes() {
    let harness = Harness::serving("tiny-mlp-raw");
    let x: Vec<f32> = vec![0.5, -1.0, 2.0, 0.25, 1.0, 1.0, -3.0, 0.0];
    let request = json!({
        "id": "req-7",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, -3.0, 0.0]]}],
    });
    let reply = harness.post("/v2/models/tiny-mlp-raw/infer", request).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    assert!(reply.header_ms("x-inference-time") >= 0.0);
    let body = reply.json();
    assert_eq!(body["model_name"], "tiny-mlp-raw");
    assert_eq!(body["model_version"], "1.0.0");
    assert_eq!(body["id"], "req-7");
    let outputs = body["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0]["name"], "y");
    assert_eq!(outputs[0]["datatype"], "FP32");
    assert_eq!(outputs[0]["shape"], json!([2, 3]));

    let model = harness.slot.current().unwrap();
    let input = Tensor::new("x", vec![2, 4], TensorData::Fp32(x)).unwrap();
    let expected = model.model.infer(vec![input]).unwrap();
    assert_close(&floats(&outputs[0]["data"]), fp32(&expected[0]));
}

#[tokio::test]
async fn requested_outputs_are_honoured_and_unknown_ones_refused() {
    let harness = Harness::serving("tiny-mlp-raw");
    let input = json!({"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]});

    let reply = harness
        .post(
            "/v2/models/tiny-mlp-raw/infer",
            json!({"inputs": [input], "outputs": [{"name": "y"}]}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert_eq!(body["outputs"][0]["name"], "y");
    assert!(body.get("id").is_none(), "no id was given: {body}");

    harness
        .post(
            "/v2/models/tiny-mlp-raw/infer",
            json!({"inputs": [input], "outputs": [{"name": "z"}]}),
        )
        .await
        .assert_error(StatusCode::BAD_REQUEST, "unknown output \"z\"");
    harness
        .post(
            "/v2/models/tiny-mlp-raw/infer",
            json!({"inputs": [input], "outputs": [{"name": "y"}, {"name": "y"}]}),
        )
        .await
        .assert_error(StatusCode::BAD_REQUEST, "requested more than once");
}

#[tokio::test]
async fn text_models_run_a_bytes_input_through_the_text_pipeline() {
    let sentences = texts(&["hello world", "今天天气很好，我们去公园散步吧"]);
    for (model, output, shape) in [
        ("tiny-bert-embed", "embeddings", json!([2])),
        ("tiny-bert-embed", "embeddings", json!([2, 1])),
        ("tiny-bert-classify", "probabilities", json!([2])),
    ] {
        let harness = Harness::serving(model);
        let request = json!({
            "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": shape, "data": sentences}],
        });
        let reply = harness
            .post(&format!("/v2/models/{model}/infer"), request)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
        assert!(reply.header_ms("x-tokenization-time") >= 0.0);
        assert!(reply.header_ms("x-inference-time") >= 0.0);
        let body = reply.json();
        let out = &body["outputs"][0];
        assert_eq!(out["name"], output);

        let expected = harness
            .slot
            .current()
            .unwrap()
            .model
            .run_texts(&sentences)
            .unwrap();
        assert_eq!(out["shape"], json!(expected.shape));
        assert_close(&floats(&out["data"]), fp32(&expected));
    }
}

#[tokio::test]
async fn text_models_refuse_token_tensors_and_odd_text_inputs() {
    let harness = Harness::serving("tiny-bert-embed");
    let ids =
        json!({"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [2, 99999, 3]});
    let mask =
        json!({"name": "attention_mask", "datatype": "INT64", "shape": [1, 3], "data": [1, 1, 1]});
    let types =
        json!({"name": "token_type_ids", "datatype": "INT64", "shape": [1, 3], "data": [0, 0, 0]});
    let grid = json!({"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]});
    for inputs in [json!([ids, mask, types]), json!([grid])] {
        harness
            .post(
                "/v2/models/tiny-bert-embed/infer",
                json!({ "inputs": inputs }),
            )
            .await
            .assert_error(
                StatusCode::BAD_REQUEST,
                "tiny-bert-embed is a text model (embedding): send exactly one BYTES input",
            );
    }
}

#[tokio::test]
async fn bad_tensors_and_bodies_get_400_json_errors() {
    let harness = Harness::serving("tiny-mlp-raw");
    let cases = [
        (
            json!({"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]}).to_string(),
            "unknown input \"z\"",
        ),
        (
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 5], "data": [0, 0, 0, 0, 0]}]}).to_string(),
            "must have shape [batch, 4]",
        ),
        (
            json!({"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 4], "data": [0, 0, 0, 0]}]}).to_string(),
            "must be FP32, got INT64",
        ),
        (
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0]}]}).to_string(),
            "holds 4 values but 3 were given",
        ),
        (
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, "a", 0, 0]}]}).to_string(),
            "element 1 is not a valid FP32",
        ),
        (
            json!({"inputs": [{"name": "x", "datatype": "INT16", "shape": [1, 4], "data": [0, 0, 0, 0]}]}).to_string(),
            "inputs[0].datatype: unknown variant `INT16`",
        ),
        (
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4]}]}).to_string(),
            "input \"x\" has no data",
        ),
        (json!({"inputs": []}).to_string(), "missing input \"x\""),
        (json!({"outputs": []}).to_string(), "missing field `inputs`"),
        (json!({"inputs": {"x": 1}}).to_string(), "inputs: invalid type"),
        ("{\"inputs\": [".to_owned(), "invalid request body"),
        ("".to_owned(), "invalid request body"),
        (
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0], "parameters": {"shared_memory_region": "r"}}]}).to_string(),
            "not supported",
        ),
    ];
    for (body, phrase) in cases {
        harness
            .post_raw("/v2/models/tiny-mlp-raw/infer", body)
            .await
            .assert_error(StatusCode::BAD_REQUEST, phrase);
    }

    // The model keeps serving after all of that.
    let good = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]});
    let reply = harness.post("/v2/models/tiny-mlp-raw/infer", good).await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let config = ApiConfig {
        max_body_bytes: 1024,
        ..ApiConfig::default()
    };
    let harness = Harness::empty(config, 2);
    harness.slot.activate(served("tiny-bert-embed"));
    let big = json!({"inputs": "word ".repeat(400)});
    for uri in ["/v1/embed", "/v2/models/tiny-bert-embed/infer"] {
        harness.post(uri, big.clone()).await.assert_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "exceeds the limit of 1024 bytes",
        );
    }
}

#[tokio::test]
async fn batches_over_the_item_limit_are_413() {
    let config = ApiConfig {
        max_batch_items: 2,
        ..ApiConfig::default()
    };
    let harness = Harness::empty(config.clone(), 2);
    harness.slot.activate(served("tiny-bert-embed"));
    let three = json!(["a", "b", "c"]);
    for (uri, body) in [
        ("/v1/embed", json!({"inputs": three})),
        ("/v1/tokenize", json!({"text": three})),
        (
            "/v1/embeddings",
            json!({"model": "tiny-bert-embed", "input": three}),
        ),
        (
            "/v2/models/tiny-bert-embed/infer",
            json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": three}]}),
        ),
    ] {
        harness.post(uri, body).await.assert_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "3 texts in one request exceed the limit of 2",
        );
    }

    let raw = Harness::empty(config, 2);
    raw.slot.activate(served("tiny-mlp-raw"));
    let rows = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 4], "data": vec![0; 12]}]});
    raw.post("/v2/models/tiny-mlp-raw/infer", rows)
        .await
        .assert_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "3 rows in one request exceed the limit of 2",
        );
}

#[tokio::test]
async fn exhausted_inference_slots_give_429_with_retry_after() {
    let unbatched = ApiConfig {
        batching: BatchingConfig {
            enabled: false,
            ..BatchingConfig::default()
        },
        ..ApiConfig::default()
    };
    let harness = Harness::empty(unbatched, 1);
    harness.slot.activate(served("tiny-bert-embed"));
    let held = harness.slot.try_lease().unwrap();

    for (uri, body) in [
        ("/v1/embed", json!({"inputs": "hi"})),
        ("/v1/tokenize", json!({"text": "hi"})),
        (
            "/v2/models/tiny-bert-embed/infer",
            json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}),
        ),
    ] {
        let reply = harness.post(uri, body).await;
        reply.assert_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many concurrent requests",
        );
        assert_eq!(reply.headers[header::RETRY_AFTER], "1");
    }

    drop(held);
    let reply = harness.post("/v1/embed", json!({"inputs": "hi"})).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        harness.slot.in_flight(),
        0,
        "the request gave its slot back"
    );
}

#[tokio::test]
async fn long_texts_are_rejected_by_index_or_truncated_and_counted_per_bundle() {
    let long = "hello ".repeat(300);

    let strict = Harness::empty(ApiConfig::default(), 2);
    strict.slot.activate(served_with(
        "tiny-bert-embed",
        "1.0.0",
        Truncation::Reject,
        128,
    ));
    let both = json!(["short", long]);
    strict
        .post("/v1/embed", json!({"inputs": both}))
        .await
        .assert_error(
            StatusCode::BAD_REQUEST,
            "text 1 has 302 tokens, the model takes at most 128",
        );
    strict
        .post(
            "/v2/models/tiny-bert-embed/infer",
            json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": both}]}),
        )
        .await
        .assert_error(StatusCode::BAD_REQUEST, "text 1 has");

    let lenient = Harness::serving("tiny-bert-embed");
    let reply = lenient
        .post("/v1/embed", json!({"inputs": ["short", long, long]}))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["x-flotilla-truncated"], "2");
    let short = lenient.post("/v1/embed", json!({"inputs": "short"})).await;
    assert_eq!(short.headers["x-flotilla-truncated"], "0");
}

#[tokio::test]
async fn tokenize_matches_the_text_pipeline_for_english_and_chinese() {
    let harness = Harness::serving("tiny-bert-embed");
    let sentences = texts(&["Hello, world!", "今天天气很好"]);
    let reply = harness
        .post("/v1/tokenize", json!({ "text": sentences }))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.header_ms("x-tokenization-time") >= 0.0);
    let body = reply.json();

    let model = harness.slot.current().unwrap();
    let batch = model.model.text().unwrap().encode(&sentences).unwrap();
    let entries = body.as_array().unwrap();
    assert_eq!(entries.len(), 2);
    for (i, entry) in entries.iter().enumerate() {
        assert_eq!(entry["ids"], json!(batch.ids[i]));
        assert_eq!(entry["tokens"], json!(batch.tokens[i]));
        let offsets: Vec<[usize; 2]> = batch.offsets[i].iter().map(|(s, e)| [*s, *e]).collect();
        assert_eq!(entry["offsets"], json!(offsets));
        assert_eq!(entry["truncated"], false);
    }
    assert_eq!(
        entries[1]["tokens"],
        json!(["[CLS]", "今", "天", "天", "气", "很", "好", "[SEP]"])
    );
    // Offsets are byte offsets: each Chinese character is three UTF-8 bytes.
    assert_eq!(entries[1]["offsets"][1], json!([0, 3]));

    let single = harness
        .post("/v1/tokenize", json!({"inputs": "hello"}))
        .await;
    assert_eq!(
        single.json().as_array().unwrap().len(),
        1,
        "one entry for one string"
    );
}

#[tokio::test]
async fn embed_matches_run_texts_and_returns_unit_vectors() {
    let harness = Harness::serving("tiny-bert-embed");
    let sentences = texts(&["hello world", "今天天气很好，我们去公园散步吧"]);
    let reply = harness
        .post("/v1/embed", json!({ "inputs": sentences }))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.header_ms("x-inference-time") >= 0.0);
    let vectors = reply.json();
    let vectors = vectors.as_array().unwrap();
    assert_eq!(vectors.len(), 2);

    let expected = harness
        .slot
        .current()
        .unwrap()
        .model
        .run_texts(&sentences)
        .unwrap();
    for (i, vector) in vectors.iter().enumerate() {
        let got = floats(vector);
        assert_eq!(got.len(), 32);
        assert_close(&got, &fp32(&expected)[i * 32..(i + 1) * 32]);
        let norm = got.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }

    let single = harness
        .post("/v1/embed", json!({"inputs": "hello world"}))
        .await;
    let single = single.json();
    assert_eq!(
        single.as_array().unwrap().len(),
        1,
        "one vector for one string"
    );
    assert_close(&floats(&single[0]), &fp32(&expected)[..32]);
}

#[tokio::test]
async fn classify_returns_every_label_sorted_by_score_summing_to_one() {
    let harness = Harness::serving("tiny-bert-classify");
    let sentences = texts(&["I love this", "this is terrible"]);
    let reply = harness
        .post("/v1/classify", json!({ "inputs": sentences }))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();

    let expected = harness
        .slot
        .current()
        .unwrap()
        .model
        .run_texts(&sentences)
        .unwrap();
    let labels = ["negative", "neutral", "positive"];
    for (i, scores) in body.as_array().unwrap().iter().enumerate() {
        let scores = scores.as_array().unwrap();
        assert_eq!(scores.len(), 3);
        let values: Vec<f32> = scores
            .iter()
            .map(|s| s["score"].as_f64().unwrap() as f32)
            .collect();
        assert!(
            values.windows(2).all(|w| w[0] >= w[1]),
            "sorted: {values:?}"
        );
        assert!((values.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        for score in scores {
            let label = score["label"].as_str().unwrap();
            let index = labels.iter().position(|l| *l == label).unwrap();
            let want = fp32(&expected)[i * 3 + index];
            assert!((score["score"].as_f64().unwrap() as f32 - want).abs() < 1e-6);
        }
    }
}

#[tokio::test]
async fn openai_embeddings_have_the_openai_shape_in_float_and_base64() {
    let harness = Harness::serving("tiny-bert-embed");
    let sentences = texts(&["hello world", "今天天气很好"]);
    let reply = harness
        .post(
            "/v1/embeddings",
            json!({"model": "tiny-bert-embed", "input": sentences, "user": "ignored"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let body = reply.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "tiny-bert-embed");
    let model = harness.slot.current().unwrap();
    let batch = model.model.text().unwrap().encode(&sentences).unwrap();
    let tokens = batch.token_count();
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": tokens, "total_tokens": tokens})
    );
    let expected = model.model.run_texts(&sentences).unwrap();
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, entry) in data.iter().enumerate() {
        assert_eq!(entry["object"], "embedding");
        assert_eq!(entry["index"], i);
        assert_close(
            &floats(&entry["embedding"]),
            &fp32(&expected)[i * 32..(i + 1) * 32],
        );
    }

    let reply = harness
        .post(
            "/v1/embeddings",
            json!({"model": "tiny-bert-embed", "input": "hello world", "encoding_format": "base64", "dimensions": 32}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let encoded = reply.json()["data"][0]["embedding"]
        .as_str()
        .unwrap()
        .to_owned();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_close(&decoded, &fp32(&expected)[..32]);
}

#[tokio::test]
async fn openai_embeddings_refuse_other_models_formats_dimensions_and_tokens() {
    let harness = Harness::serving("tiny-bert-embed");
    let cases = [
        (
            json!({"model": "text-embedding-3-small", "input": "hi"}),
            StatusCode::NOT_FOUND,
            "\"text-embedding-3-small\" is not served here",
        ),
        (
            json!({"model": "tiny-bert-embed", "input": "hi", "encoding_format": "int8"}),
            StatusCode::BAD_REQUEST,
            "encoding_format \"int8\"",
        ),
        (
            json!({"model": "tiny-bert-embed", "input": "hi", "dimensions": 8}),
            StatusCode::BAD_REQUEST,
            "dimension 32; dimensions=8",
        ),
        (
            json!({"model": "tiny-bert-embed", "input": [[101, 102]]}),
            StatusCode::BAD_REQUEST,
            "token arrays are not supported",
        ),
        (
            json!({"input": "hi"}),
            StatusCode::BAD_REQUEST,
            "missing field `model`",
        ),
        (
            json!({"model": "tiny-bert-embed", "input": []}),
            StatusCode::BAD_REQUEST,
            "no texts given",
        ),
    ];
    for (body, status, phrase) in cases {
        harness
            .post("/v1/embeddings", body)
            .await
            .assert_error(status, phrase);
    }
}

#[tokio::test]
async fn text_endpoints_refuse_models_of_another_task() {
    let raw = Harness::serving("tiny-mlp-raw");
    for (uri, body) in [
        ("/v1/embed", json!({"inputs": "hi"})),
        ("/v1/classify", json!({"inputs": "hi"})),
        ("/v1/tokenize", json!({"text": "hi"})),
        (
            "/v1/embeddings",
            json!({"model": "tiny-mlp-raw", "input": "hi"}),
        ),
    ] {
        raw.post(uri, body)
            .await
            .assert_error(StatusCode::BAD_REQUEST, "model task is raw");
    }

    let embed = Harness::serving("tiny-bert-embed");
    embed
        .post("/v1/classify", json!({"inputs": "hi"}))
        .await
        .assert_error(
            StatusCode::BAD_REQUEST,
            "model task is embedding; /v1/classify needs a classification model",
        );
    let classify = Harness::serving("tiny-bert-classify");
    classify
        .post("/v1/embed", json!({"inputs": "hi"}))
        .await
        .assert_error(
            StatusCode::BAD_REQUEST,
            "model task is classification; /v1/embed needs an embedding model",
        );
}

#[tokio::test]
async fn malformed_text_bodies_are_400_json_not_422() {
    let harness = Harness::serving("tiny-bert-embed");
    let cases = [
        ("{\"inputs\": ", "invalid request body"),
        ("{}", "missing field `inputs`"),
        (
            "{\"inputs\": \"hi\", \"normalize\": false}",
            "unknown field `normalize`",
        ),
        (
            "{\"inputs\": [\"ok\", 3]}",
            "inputs[1]: invalid type: integer `3`, expected a string",
        ),
        ("{\"inputs\": []}", "no texts given"),
        ("[1, 2]", "invalid request body"),
    ];
    for (body, phrase) in cases {
        harness
            .post_raw("/v1/embed", body)
            .await
            .assert_error(StatusCode::BAD_REQUEST, phrase);
    }
}

#[tokio::test]
async fn unknown_routes_wrong_methods_and_compressed_bodies_get_json_errors() {
    let harness = Harness::serving("tiny-bert-embed");
    harness
        .get("/v3/nothing")
        .await
        .assert_error(StatusCode::NOT_FOUND, "no route for GET /v3/nothing");
    harness.get("/v1/embed").await.assert_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "GET is not allowed on /v1/embed",
    );

    let gzip = Request::post("/v1/embed")
        .header(header::CONTENT_ENCODING, "gzip")
        .body(Body::from(vec![0x1f, 0x8b, 0, 0]))
        .unwrap();
    harness.send(gzip).await.assert_error(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "content-encoding \"gzip\"",
    );
}

#[tokio::test]
async fn a_lease_taken_before_a_switch_keeps_the_old_model_while_new_requests_see_the_new() {
    let harness = Harness::empty(ApiConfig::default(), 4);
    harness.slot.activate(served_with(
        "tiny-bert-embed",
        "1.0.0",
        Truncation::Truncate,
        128,
    ));
    let before = harness.post("/v1/embed", json!({"inputs": "hi"})).await;
    assert_eq!(before.status, StatusCode::OK);

    let in_flight = harness.slot.try_lease().unwrap();
    let old = harness.slot.activate(served_with(
        "tiny-bert-embed",
        "2.0.0",
        Truncation::Truncate,
        128,
    ));
    assert_eq!(old.unwrap().version(), "1.0.0");

    assert_eq!(in_flight.model.version(), "1.0.0");
    let answer = in_flight.model.model.run_texts(&texts(&["hi"])).unwrap();
    assert_eq!(answer.shape, vec![1, 32]);

    let text =
        json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]});
    let after = harness
        .post("/v2/models/tiny-bert-embed/infer", text.clone())
        .await;
    assert_eq!(after.status, StatusCode::OK);
    assert_eq!(after.json()["model_version"], "2.0.0");
    harness
        .post("/v2/models/tiny-bert-embed/versions/1.0.0/infer", text)
        .await
        .assert_error(StatusCode::NOT_FOUND, "no version \"1.0.0\"");
    assert_eq!(
        harness.slot.in_flight(),
        1,
        "only the held lease is running"
    );
    drop(in_flight);

    let versions: Vec<(String, u64)> = harness
        .metrics
        .version_snapshots()
        .into_iter()
        .map(|v| (v.version, v.requests))
        .collect();
    assert_eq!(versions, [("1.0.0".to_owned(), 1), ("2.0.0".to_owned(), 1)]);
}

fn metric_value(text: &str, series: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"));
    line[series.len()..].trim().parse().unwrap()
}

#[tokio::test]
async fn metrics_count_requests_per_model_version_and_outcome() {
    let harness = Harness::serving("tiny-bert-embed");
    let model = harness.slot.current().unwrap();
    harness.metrics.model_loaded(&model);
    harness.metrics.set_self_test(model.digest, true);
    for _ in 0..2 {
        let reply = harness
            .post("/v1/embed", json!({"inputs": ["a", "b"]}))
            .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let bad = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}]});
    harness.post("/v2/models/tiny-bert-embed/infer", bad).await;
    let held = harness.slot.try_lease().unwrap();

    let reply = harness.get("/metrics").await;
    drop(held);
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.headers[header::CONTENT_TYPE],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    let labels = r#"model="tiny-bert-embed",version="1.0.0""#;
    let series = |name: &str, extra: &str| format!("{name}{{{labels}{extra}}}");
    assert_eq!(
        metric_value(
            &text,
            &series("flotilla_inference_requests_total", r#",outcome="success""#)
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &text,
            &series("flotilla_inference_duration_seconds_count", "")
        ),
        2.0
    );
    assert_eq!(
        metric_value(&text, &series("flotilla_model_load_seconds", "")),
        0.042
    );
    assert_eq!(
        metric_value(&text, &series("flotilla_model_self_test_passed", "")),
        1.0
    );
    assert_eq!(
        metric_value(&text, &series("flotilla_inference_in_flight", "")),
        0.0
    );
    assert_eq!(
        metric_value(
            &text,
            r#"flotilla_http_responses_total{endpoint="/v1/embed",status="200"}"#
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &text,
            r#"flotilla_http_responses_total{endpoint="/v2/models/{name}/infer",status="400"}"#
        ),
        1.0
    );
    assert!(metric_value(&text, "process_resident_memory_bytes") > 0.0);
    assert!(metric_value(&text, "process_cpu_seconds_total") > 0.0);

    let snapshot = &harness.metrics.version_snapshots()[0];
    assert_eq!(snapshot.name, "tiny-bert-embed");
    assert_eq!(snapshot.digest, model.digest);
    assert_eq!((snapshot.requests, snapshot.errors), (2, 0));
    assert_eq!(snapshot.latency.count(), 2);
    assert_eq!(snapshot.self_test_passed, Some(true));
}

#[tokio::test]
async fn model_failures_are_500_counted_as_errors_and_the_model_keeps_serving() {
    // A bundle that claims 200 tokens for a graph whose position table holds 128: texts between
    // the two pass the tokenizer and fail inside the model.
    let harness = Harness::empty(ApiConfig::default(), 2);
    harness.slot.activate(served_with(
        "tiny-bert-embed",
        "1.0.0",
        Truncation::Reject,
        200,
    ));
    let reply = harness
        .post("/v1/embed", json!({"inputs": "hello ".repeat(150)}))
        .await;
    reply.assert_error(StatusCode::INTERNAL_SERVER_ERROR, "inference failed");

    let fine = harness.post("/v1/embed", json!({"inputs": "hello"})).await;
    assert_eq!(fine.status, StatusCode::OK);

    let text = harness.metrics.render();
    let labels = r#"model="tiny-bert-embed",version="1.0.0""#;
    assert_eq!(
        metric_value(
            &text,
            &format!("flotilla_inference_errors_total{{{labels}}}")
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &text,
            &format!(r#"flotilla_inference_requests_total{{{labels},outcome="model_error"}}"#)
        ),
        1.0
    );
    let snapshot = &harness.metrics.version_snapshots()[0];
    assert_eq!((snapshot.requests, snapshot.errors), (2, 1));
}

#[tokio::test]
async fn self_test_results_reported_before_the_load_are_kept() {
    let metrics = Metrics::new();
    let model = served("tiny-mlp-raw");
    metrics.set_self_test(model.digest, false);
    assert!(metrics.version_snapshots().is_empty());
    metrics.model_loaded(&model);
    let snapshot = metrics.version_snapshots();
    assert_eq!(snapshot.len(), 1);
    assert_eq!(snapshot[0].self_test_passed, Some(false));
    assert_eq!(snapshot[0].requests, 0);
    let text = metrics.render();
    assert_eq!(
        metric_value(
            &text,
            r#"flotilla_model_self_test_passed{model="tiny-mlp-raw",version="1.0.0"}"#
        ),
        0.0
    );
}

// --- tritonclient compatibility -------------------------------------------------------------

/// A request `tritonclient.http` sent, as captured from the wire.
struct Captured {
    method: Method,
    uri: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn captured(name: &str) -> Captured {
    let path = fixtures().join("tritonclient").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).unwrap();
    Captured {
        method: v["method"].as_str().unwrap().parse().unwrap(),
        uri: v["uri"].as_str().unwrap().to_owned(),
        headers: v["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h[0].as_str().unwrap().to_owned(),
                    h[1].as_str().unwrap().to_owned(),
                )
            })
            .collect(),
        body: base64::engine::general_purpose::STANDARD
            .decode(v["body_base64"].as_str().unwrap())
            .unwrap(),
    }
}

async fn replay(harness: &Harness, name: &str) -> Reply {
    let c = captured(name);
    let mut request = Request::builder().method(c.method).uri(c.uri);
    for (key, value) in c.headers {
        request = request.header(key, value);
    }
    harness
        .send(request.body(Body::from(c.body)).unwrap())
        .await
}

/// Parses an infer reply the way `tritonclient.http.InferResult` does: a JSON header of
/// `Inference-Header-Content-Length` bytes (or the whole body), then binary outputs in order.
fn triton_outputs(reply: &Reply) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let (header, mut raw) = match reply.headers.get("inference-header-content-length") {
        Some(length) => reply
            .body
            .split_at(length.to_str().unwrap().parse().unwrap()),
        None => (&reply.body[..], &[][..]),
    };
    let result: Value = serde_json::from_slice(header).unwrap();
    result["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            assert_eq!(o["datatype"], "FP32");
            let shape: Vec<usize> = serde_json::from_value(o["shape"].clone()).unwrap();
            let values = match o["parameters"]["binary_data_size"].as_u64() {
                Some(size) => {
                    let (bytes, rest) = raw.split_at(size as usize);
                    raw = rest;
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect()
                }
                None => floats(&o["data"]),
            };
            assert_eq!(values.len(), shape.iter().product::<usize>());
            (o["name"].as_str().unwrap().to_owned(), shape, values)
        })
        .collect()
}

#[tokio::test]
async fn tritonclient_health_and_metadata_requests_get_what_it_parses() {
    let harness = Harness::serving("tiny-mlp-raw");
    assert_eq!(
        replay(&harness, "is_server_live").await.status,
        StatusCode::OK
    );
    assert_eq!(
        replay(&harness, "is_server_ready").await.status,
        StatusCode::OK
    );
    assert_eq!(
        replay(&harness, "is_model_ready").await.status,
        StatusCode::OK
    );
    let server = replay(&harness, "get_server_metadata").await;
    assert_eq!(server.json()["name"], "flotilla");

    let metadata = replay(&harness, "get_model_metadata").await;
    assert_eq!(metadata.status, StatusCode::OK);
    let metadata = metadata.json();
    assert_eq!(metadata["name"], "tiny-mlp-raw");
    assert_eq!(metadata["inputs"][0]["shape"], json!([-1, 4]));

    let missing = replay(&harness, "is_model_ready_unknown").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(
        missing.json()["error"].is_string(),
        "tritonclient reads error"
    );
}

#[tokio::test]
async fn tritonclient_json_infer_on_a_raw_model_matches_the_model() {
    let harness = Harness::serving("tiny-mlp-raw");
    let model = harness.slot.current().unwrap();
    let x = [0.5f32, -1.0, 2.0, 0.25, 1.0, 1.0, -3.0, 0.0];
    let input = Tensor::new("x", vec![2, 4], TensorData::Fp32(x.to_vec())).unwrap();
    let expected = model.model.infer(vec![input]).unwrap();

    for name in ["infer_raw_json", "infer_raw_binary"] {
        let reply = replay(&harness, name).await;
        assert_eq!(reply.status, StatusCode::OK, "{name}: {:?}", reply.body);
        let outputs = triton_outputs(&reply);
        assert_eq!(outputs.len(), 1, "{name}");
        let (output, shape, values) = &outputs[0];
        assert_eq!(
            (output.as_str(), shape.as_slice()),
            ("y", &[2, 3][..]),
            "{name}"
        );
        assert_close(values, fp32(&expected[0]));
    }

    let json = replay(&harness, "infer_raw_json").await;
    assert!(json
        .headers
        .get("inference-header-content-length")
        .is_none());
    assert_eq!(json.json()["id"], "tc-1");
    let binary = replay(&harness, "infer_raw_binary").await;
    assert_eq!(
        binary.headers[header::CONTENT_TYPE],
        "application/octet-stream"
    );
}

#[tokio::test]
async fn tritonclient_bytes_infer_on_a_text_model_returns_embeddings() {
    let harness = Harness::serving("tiny-bert-embed");
    let model = harness.slot.current().unwrap();
    let expected = model
        .model
        .run_texts(&texts(&["hello world", "今天天气很好"]))
        .unwrap();

    for name in ["infer_text_json", "infer_text_binary"] {
        let reply = replay(&harness, name).await;
        assert_eq!(reply.status, StatusCode::OK, "{name}: {:?}", reply.body);
        let outputs = triton_outputs(&reply);
        let (output, shape, values) = &outputs[0];
        assert_eq!(
            (output.as_str(), shape.as_slice()),
            ("embeddings", &[2, 32][..])
        );
        assert_close(values, fp32(&expected));
    }
}

#[tokio::test]
async fn binary_requests_with_inconsistent_lengths_are_400() {
    let harness = Harness::serving("tiny-mlp-raw");
    let header = r#"{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","parameters":{"binary_data_size":16}}]}"#;
    let post = |length: &str, body: Vec<u8>| {
        Request::post("/v2/models/tiny-mlp-raw/infer")
            .header("Inference-Header-Content-Length", length)
            .body(Body::from(body))
            .unwrap()
    };
    let mut short = header.as_bytes().to_vec();
    short.extend_from_slice(&[0; 8]);
    let mut extra = header.as_bytes().to_vec();
    extra.extend_from_slice(&[0; 20]);
    let cases = [
        (post("many", header.into()), "must be a byte count"),
        (post("100000", header.into()), "the body has only"),
        (
            post(&header.len().to_string(), short),
            "declares 16 bytes of binary data, 8 remain",
        ),
        (
            post(&header.len().to_string(), extra),
            "4 bytes of binary data follow",
        ),
    ];
    for (request, phrase) in cases {
        harness
            .send(request)
            .await
            .assert_error(StatusCode::BAD_REQUEST, phrase);
    }

    let no_header = Request::post("/v2/models/tiny-mlp-raw/infer")
        .body(Body::from(header))
        .unwrap();
    harness.send(no_header).await.assert_error(
        StatusCode::BAD_REQUEST,
        "has no inference-header-content-length header",
    );
}

fn embeddings(reply: &Reply) -> Vec<Vec<f32>> {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    serde_json::from_value(reply.json()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_run_as_one_batch_and_match_one_at_a_time() {
    let config = ApiConfig {
        batching: BatchingConfig {
            // Never reached: the batch closes when the last admitted request is queued.
            max_wait_ms: 3_600_000,
            ..BatchingConfig::default()
        },
        ..ApiConfig::default()
    };
    let harness = Arc::new(Harness::empty(config, 2));
    let model = served("tiny-bert-embed");
    harness.slot.activate(model.clone());
    let requests: Vec<Vec<String>> = (0..12)
        .map(|i| {
            (0..1 + i % 3)
                .map(|j| format!("request {i} text {j} {}", "word ".repeat(i * j)))
                .collect()
        })
        .collect();
    let total: usize = requests.iter().map(Vec::len).sum();

    // Hold the batch open (as a request still tokenising would) until every request queued.
    let plug = harness.state.batcher.admit().unwrap();
    let tasks: Vec<_> = requests
        .iter()
        .map(|texts| {
            let (harness, body) = (harness.clone(), json!({ "inputs": texts }));
            tokio::spawn(async move { harness.post("/v1/embed", body).await })
        })
        .collect();
    while harness.state.batcher.waiting() < requests.len() {
        tokio::task::yield_now().await;
    }
    drop(plug);

    for (texts, task) in requests.iter().zip(tasks) {
        let reply = task.await.unwrap();
        // Every request held its place until it was queued, so one batch takes them all.
        assert_eq!(
            reply.headers["x-flotilla-batch-size"],
            total.to_string().as_str()
        );
        for name in ["x-queue-time", "x-tokenization-time", "x-inference-time"] {
            let ms: f64 = reply.headers[name].to_str().unwrap().parse().unwrap();
            assert!(ms >= 0.0, "{name}");
        }
        let got = embeddings(&reply);
        let alone = model.model.run_texts(texts).unwrap();
        let TensorData::Fp32(expected) = &alone.data else {
            panic!("fp32")
        };
        assert_eq!(got.len(), texts.len(), "one row per text, in order");
        for (row, expected) in got.iter().zip(expected.chunks(32)) {
            let diff = row
                .iter()
                .zip(expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{texts:?}: {diff}");
        }
    }
}

#[tokio::test]
async fn classify_and_openai_embeddings_are_batched_too() {
    let harness = Harness::serving("tiny-bert-classify");
    let reply = harness
        .post("/v1/classify", json!({"inputs": ["I love this", "awful"]}))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["x-flotilla-batch-size"], "2");
    assert_eq!(reply.json().as_array().unwrap().len(), 2);

    let harness = Harness::serving("tiny-bert-embed");
    let reply = harness
        .post(
            "/v1/embeddings",
            json!({"model": "tiny-bert-embed", "input": ["a", "b", "c"]}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["x-flotilla-batch-size"], "3");
    assert!(reply.headers.contains_key("x-queue-time"));
}

#[tokio::test]
async fn a_full_batching_queue_answers_429_with_retry_after() {
    let config = ApiConfig {
        batching: BatchingConfig {
            max_queue: 1,
            ..BatchingConfig::default()
        },
        ..ApiConfig::default()
    };
    let harness = Harness::empty(config, 2);
    harness.slot.activate(served("tiny-bert-embed"));
    let held = harness.state.batcher.admit().unwrap();

    let reply = harness.post("/v1/embed", json!({"inputs": "hi"})).await;
    reply.assert_error(StatusCode::TOO_MANY_REQUESTS, "queue is full");
    assert_eq!(reply.headers[header::RETRY_AFTER], "1");

    drop(held);
    let reply = harness.post("/v1/embed", json!({"inputs": "hi"})).await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn a_passed_deadline_is_503_with_retry_after_and_a_bad_one_is_400() {
    let harness = Harness::serving("tiny-bert-embed");
    let request = |deadline: &str| {
        Request::post("/v1/embed")
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-flotilla-deadline-ms", deadline)
            .body(Body::from(json!({"inputs": "hi"}).to_string()))
            .unwrap()
    };
    let reply = harness.send(request("0")).await;
    reply.assert_error(StatusCode::SERVICE_UNAVAILABLE, "deadline passed");
    assert_eq!(reply.headers[header::RETRY_AFTER], "1");

    let reply = harness.send(request("soon")).await;
    reply.assert_error(StatusCode::BAD_REQUEST, "x-flotilla-deadline-ms");

    let reply = harness.send(request("60000")).await;
    assert_eq!(reply.status, StatusCode::OK);
}
