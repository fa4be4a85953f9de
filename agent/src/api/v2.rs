//! Open Inference Protocol v2 (KServe `inference_rest.md`, Triton's HTTP API): health, server
//! and model metadata, readiness and inference, with Triton's binary tensor data extension.
//!
//! Raw models take their graph inputs as tensors. Text models (embedding, classification) take
//! exactly one `BYTES` input of shape `[n]` or `[n, 1]`, whatever its name, run it through the
//! bundle's text pipeline and answer with the task tensor (`embeddings` or `probabilities`,
//! FP32 `[n, k]`); their metadata advertises that interface. Token tensors are not accepted for
//! text models: the graph's embedding lookup does not check token ids, so only the bundle's own
//! tokenizer feeds it.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use flotilla_shared::manifest::{text_output_name, Task};
use flotilla_shared::tensor::{DataType, Dim, Tensor, TensorData, TensorSpec};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::error::{parse_json, read_body, reject_encoded_body, ApiError};
use super::run::{self, INFERENCE_TIME};
use super::{binary, ApiState, PathParams};
use crate::serving::ServedModel;

/// Name of the binary tensor extension in server metadata.
pub const BINARY_EXTENSION: &str = "binary_tensor_data";

/// Name advertised for a text model's `BYTES` input (any name is accepted).
pub const TEXT_INPUT: &str = "text";

/// `/v2/models/{name}[/versions/{version}]` path parameters.
#[derive(Debug, Deserialize)]
pub struct ModelRef {
    name: String,
    #[serde(default)]
    version: Option<String>,
}

impl ModelRef {
    /// Checks that this agent serves the named model (and version, when given): 404 otherwise.
    fn check(&self, model: &ServedModel) -> Result<(), ApiError> {
        if self.name != model.name() {
            return Err(ApiError::ModelNotFound(format!(
                "model {:?} is not served here; this agent serves {:?}",
                self.name,
                model.name()
            )));
        }
        match &self.version {
            Some(version) if *version != model.version() => Err(ApiError::ModelNotFound(format!(
                "model {:?} has no version {version:?} here; this agent serves version {}",
                self.name,
                model.version()
            ))),
            _ => Ok(()),
        }
    }
}

/// `GET /v2/health/live`: 200 while the process serves HTTP.
pub async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

/// `GET /v2/health/ready`: 200 when a model is loaded, 503 before.
pub async fn ready(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    state
        .slot
        .current()
        .ok_or(crate::serving::AcquireError::NoModel)?;
    Ok(Json(json!({ "ready": true })))
}

/// `GET /v2`: server metadata.
pub async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "flotilla",
        "version": crate::agent_version().to_string(),
        "extensions": [BINARY_EXTENSION],
    }))
}

/// `GET /v2/models/{name}[/versions/{version}]`: model metadata.
pub async fn model_metadata(
    State(state): State<ApiState>,
    PathParams(model_ref): PathParams<ModelRef>,
) -> Result<Json<Value>, ApiError> {
    let model = state
        .slot
        .current()
        .ok_or(crate::serving::AcquireError::NoModel)?;
    model_ref.check(&model)?;
    Ok(Json(metadata(&model)))
}

/// `GET /v2/models/{name}[/versions/{version}]/ready`.
pub async fn model_ready(
    State(state): State<ApiState>,
    PathParams(model_ref): PathParams<ModelRef>,
) -> Result<Json<Value>, ApiError> {
    let model = state
        .slot
        .current()
        .ok_or(crate::serving::AcquireError::NoModel)?;
    model_ref.check(&model)?;
    Ok(Json(json!({ "name": model.name(), "ready": true })))
}

/// A tensor description as v2 clients expect it: symbolic dimensions are -1.
#[derive(Debug, Serialize)]
struct SpecJson {
    name: String,
    datatype: DataType,
    shape: Vec<i64>,
}

impl SpecJson {
    fn new(name: &str, datatype: DataType, shape: &[Dim]) -> Self {
        let shape = shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => i64::try_from(*n).unwrap_or(-1),
                Dim::Symbol(_) => -1,
            })
            .collect();
        Self {
            name: name.to_owned(),
            datatype,
            shape,
        }
    }

    fn of(spec: &TensorSpec) -> Self {
        Self::new(&spec.name, spec.datatype, &spec.shape)
    }
}

/// What a client sends and gets: graph tensors for raw models, text in and the task tensor out
/// for text models.
fn served_signature(model: &ServedModel) -> (Vec<SpecJson>, Vec<SpecJson>) {
    let meta = model.model.meta();
    let Some(text) = &meta.text else {
        return (
            meta.inputs.iter().map(SpecJson::of).collect(),
            meta.outputs.iter().map(SpecJson::of).collect(),
        );
    };
    let width = match meta.task {
        Task::Classification => Dim::Fixed(meta.labels.len() as u64),
        _ => meta
            .outputs
            .iter()
            .find(|o| o.name == text.output)
            .and_then(|o| o.shape.last().cloned())
            .unwrap_or_else(|| Dim::Symbol("?".into())),
    };
    let batch = Dim::Symbol("batch".into());
    (
        vec![SpecJson::new(
            TEXT_INPUT,
            DataType::Bytes,
            std::slice::from_ref(&batch),
        )],
        vec![SpecJson::new(
            text_output_name(meta.task),
            DataType::Fp32,
            &[batch, width],
        )],
    )
}

fn metadata(model: &ServedModel) -> Value {
    let (inputs, outputs) = served_signature(model);
    let info = model.model.info();
    json!({
        "name": model.name(),
        "versions": [model.version()],
        "platform": "onnx",
        "inputs": inputs,
        "outputs": outputs,
        "parameters": {
            "task": model.model.meta().task.to_string(),
            "backend": info.backend.to_string(),
            "provider": info.provider,
            "degraded": model.model.degradation(),
            "digest": model.digest.to_hex(),
        },
    })
}

#[derive(Debug, Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InferInput>,
    #[serde(default)]
    outputs: Vec<RequestedOutput>,
}

#[derive(Debug, Deserialize)]
struct InferInput {
    name: String,
    datatype: DataType,
    shape: Vec<usize>,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    parameters: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// An output the client asked for and how it wants the values.
#[derive(Debug, Clone)]
struct Wanted {
    name: String,
    binary: bool,
}

/// A parsed inference request.
#[derive(Debug)]
struct InferCall {
    id: Option<String>,
    inputs: Vec<Tensor>,
    /// Requested outputs in order; empty means all, in `binary_default` form.
    wanted: Vec<Wanted>,
    binary_default: bool,
}

fn bool_param(params: &Map<String, Value>, key: &str, owner: &str) -> Result<bool, ApiError> {
    match params.get(key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::BadRequest(format!(
            "{owner}: parameter {key:?} must be a boolean, got {other}"
        ))),
    }
}

fn refuse_unsupported(params: &Map<String, Value>, owner: &str) -> Result<(), ApiError> {
    for key in ["shared_memory_region", "classification"] {
        if params.contains_key(key) {
            return Err(ApiError::BadRequest(format!(
                "{owner}: parameter {key:?} is not supported by this server"
            )));
        }
    }
    Ok(())
}

/// Reads `Inference-Header-Content-Length`, if present.
fn header_length(headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
    let Some(value) = headers.get(binary::HEADER_LENGTH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "header {} must be a byte count, got {:?}",
                binary::HEADER_LENGTH,
                String::from_utf8_lossy(value.as_bytes())
            ))
        })
}

/// Splits the body into the JSON header and the binary section, and builds the input tensors.
fn parse_call(body: &Bytes, header_length: Option<usize>) -> Result<InferCall, ApiError> {
    let (header, mut raw) = match header_length {
        None => (&body[..], &[][..]),
        Some(length) if length <= body.len() => body.split_at(length),
        Some(length) => {
            return Err(ApiError::BadRequest(format!(
                "{} is {length} but the body has only {} bytes",
                binary::HEADER_LENGTH,
                body.len()
            )))
        }
    };
    let request: InferRequest = parse_json(header)?;
    refuse_unsupported(&request.parameters, "request")?;
    let binary_default = bool_param(&request.parameters, "binary_data_output", "request")?;

    let mut inputs = Vec::with_capacity(request.inputs.len());
    for (index, input) in request.inputs.into_iter().enumerate() {
        let owner = format!("input {:?}", input.name);
        refuse_unsupported(&input.parameters, &owner)?;
        let size = match input.parameters.get("binary_data_size") {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "{owner}: parameter \"binary_data_size\" must be a byte count, got {v}"
                ))
            })?),
        };
        let tensor = match (size, input.data) {
            (Some(_), Some(_)) => {
                return Err(ApiError::BadRequest(format!(
                    "{owner} has both JSON data and binary_data_size"
                )))
            }
            (None, None) => {
                return Err(ApiError::BadRequest(format!("{owner} has no data")));
            }
            (Some(_), None) if header_length.is_none() => {
                return Err(ApiError::BadRequest(format!(
                    "{owner} declares binary_data_size but the request has no {} header",
                    binary::HEADER_LENGTH
                )))
            }
            (Some(size), None) => {
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                if size > raw.len() {
                    return Err(ApiError::BadRequest(format!(
                        "{owner} declares {size} bytes of binary data, {} remain in the body",
                        raw.len()
                    )));
                }
                let (bytes, rest) = raw.split_at(size);
                raw = rest;
                binary::decode(&input.name, input.datatype, input.shape, bytes)?
            }
            (None, Some(data)) => {
                let wire = json!({
                    "name": input.name,
                    "datatype": input.datatype,
                    "shape": input.shape,
                    "data": data,
                });
                serde_json::from_value(wire)
                    .map_err(|e| ApiError::InvalidBody(format!("inputs[{index}]: {e}")))?
            }
        };
        inputs.push(tensor);
    }
    if !raw.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "{} bytes of binary data follow the header but no input claims them",
            raw.len()
        )));
    }

    let wanted = request
        .outputs
        .into_iter()
        .map(|output| {
            let owner = format!("output {:?}", output.name);
            refuse_unsupported(&output.parameters, &owner)?;
            let binary = match output.parameters.get("binary_data") {
                None => binary_default,
                Some(_) => bool_param(&output.parameters, "binary_data", &owner)?,
            };
            Ok(Wanted {
                name: output.name,
                binary,
            })
        })
        .collect::<Result<_, ApiError>>()?;

    Ok(InferCall {
        id: request.id,
        inputs,
        wanted,
        binary_default,
    })
}

/// Refuses batches over `max` texts or rows, before any model work.
fn check_batch(inputs: &[Tensor], max: usize) -> Result<(), ApiError> {
    for input in inputs {
        let Some(&rows) = input.shape.first() else {
            continue;
        };
        if rows > max {
            let what = if input.datatype() == DataType::Bytes {
                "texts"
            } else {
                "rows"
            };
            return Err(ApiError::TooManyItems {
                count: rows,
                what,
                max,
            });
        }
    }
    Ok(())
}

/// What runs on the model: texts through the pipeline, or tensors straight in.
#[derive(Debug)]
enum Job {
    Texts(Vec<String>),
    Tensors(Vec<Tensor>),
}

fn job_for(model: &ServedModel, inputs: Vec<Tensor>) -> Result<Job, ApiError> {
    let meta = model.model.meta();
    if meta.task == Task::Raw {
        return Ok(Job::Tensors(inputs));
    }
    let refuse = || {
        ApiError::BadRequest(format!(
            "{} is a text model ({}): send exactly one BYTES input of shape [n] or [n, 1] \
             holding the texts",
            model.name(),
            meta.task
        ))
    };
    let [input] = <[Tensor; 1]>::try_from(inputs).map_err(|_| refuse())?;
    let column = matches!(input.shape.as_slice(), [_] | [_, 1]);
    match input.data {
        TensorData::Bytes(texts) if column => Ok(Job::Texts(texts)),
        _ => Err(refuse()),
    }
}

/// Checks requested output names against what the model answers with.
fn check_wanted(model: &ServedModel, wanted: &[Wanted]) -> Result<(), ApiError> {
    let meta = model.model.meta();
    let available: Vec<&str> = match meta.task {
        Task::Raw => meta.outputs.iter().map(|o| o.name.as_str()).collect(),
        task => vec![text_output_name(task)],
    };
    for (i, w) in wanted.iter().enumerate() {
        if wanted[..i].iter().any(|earlier| earlier.name == w.name) {
            return Err(ApiError::BadRequest(format!(
                "output {:?} is requested more than once",
                w.name
            )));
        }
        if !available.contains(&w.name.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "unknown output {:?}; {} produces {}",
                w.name,
                model.name(),
                available.join(", ")
            )));
        }
    }
    Ok(())
}

/// Model outputs and the headers describing how they were made.
#[derive(Debug)]
struct Answer {
    outputs: Vec<Tensor>,
    headers: HeaderMap,
}

fn execute(model: &ServedModel, job: Job) -> Result<Answer, ApiError> {
    match job {
        Job::Texts(texts) => {
            let ran = run::run_texts(model, &texts)?;
            let headers = ran.headers();
            Ok(Answer {
                outputs: vec![ran.output],
                headers,
            })
        }
        Job::Tensors(inputs) => {
            let started = Instant::now();
            let outputs = model.model.infer(inputs)?;
            let mut headers = HeaderMap::new();
            headers.insert(INFERENCE_TIME, run::millis(started.elapsed()));
            Ok(Answer { outputs, headers })
        }
    }
}

#[derive(Debug, Serialize)]
struct BinaryParameters {
    binary_data_size: usize,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum OutputTensor {
    Json(Tensor),
    Binary {
        name: String,
        datatype: DataType,
        shape: Vec<usize>,
        parameters: BinaryParameters,
    },
}

#[derive(Debug, Serialize)]
struct InferResponse {
    model_name: String,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: Vec<OutputTensor>,
}

/// `POST /v2/models/{name}[/versions/{version}]/infer`.
pub async fn infer(
    State(state): State<ApiState>,
    PathParams(model_ref): PathParams<ModelRef>,
    request: Request,
) -> Result<Response, ApiError> {
    reject_encoded_body(&request)?;
    let header_length = header_length(request.headers())?;
    let body = read_body(request, &state).await?;
    let call = parse_call(&body, header_length)?;
    drop(body);
    check_batch(&call.inputs, state.config.max_batch_items)?;

    let lease = state.slot.try_lease()?;
    model_ref.check(&lease.model)?;
    check_wanted(&lease.model, &call.wanted)?;
    let job = job_for(&lease.model, call.inputs)?;
    let (wanted, binary_default) = (call.wanted, call.binary_default);

    let ran = run::counted(&state.metrics, lease, move |model| {
        let answer = execute(model, job)?;
        select(answer, &wanted, binary_default)
    })
    .await?;
    respond(&ran.model, call.id, ran.value)
}

/// The outputs to return, in the order asked for (all, in model order, when none were).
#[derive(Debug)]
struct Selected {
    outputs: Vec<(Tensor, bool)>,
    headers: HeaderMap,
}

fn select(answer: Answer, wanted: &[Wanted], binary_default: bool) -> Result<Selected, ApiError> {
    if wanted.is_empty() {
        return Ok(Selected {
            outputs: answer
                .outputs
                .into_iter()
                .map(|o| (o, binary_default))
                .collect(),
            headers: answer.headers,
        });
    }
    let mut produced = answer.outputs;
    let mut outputs = Vec::with_capacity(wanted.len());
    for w in wanted {
        let position = produced
            .iter()
            .position(|o| o.name == w.name)
            .ok_or_else(|| {
                ApiError::Task(format!("the model did not produce output {:?}", w.name))
            })?;
        outputs.push((produced.swap_remove(position), w.binary));
    }
    Ok(Selected {
        outputs,
        headers: answer.headers,
    })
}

fn respond(
    model: &ServedModel,
    id: Option<String>,
    selected: Selected,
) -> Result<Response, ApiError> {
    let any_binary = selected.outputs.iter().any(|(_, binary)| *binary);
    let mut outputs = Vec::with_capacity(selected.outputs.len());
    let mut raw = Vec::new();
    for (tensor, binary) in selected.outputs {
        if !binary {
            outputs.push(OutputTensor::Json(tensor));
            continue;
        }
        let bytes = binary::encode(&tensor.data);
        outputs.push(OutputTensor::Binary {
            name: tensor.name,
            datatype: tensor.data.datatype(),
            shape: tensor.shape,
            parameters: BinaryParameters {
                binary_data_size: bytes.len(),
            },
        });
        raw.extend_from_slice(&bytes);
    }

    let response = InferResponse {
        model_name: model.name().to_owned(),
        model_version: model.version(),
        id,
        outputs,
    };
    let mut body = serde_json::to_vec(&response)
        .map_err(|e| ApiError::Task(format!("cannot encode the response: {e}")))?;
    let mut headers = selected.headers;
    if any_binary {
        headers.insert(binary::HEADER_LENGTH, HeaderValue::from(body.len()));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        body.extend_from_slice(&raw);
    } else {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    Ok((headers, body).into_response())
}
