//! Text endpoints for text models: tokenize, embed and classify in a TEI-like shape, and
//! OpenAI-compatible embeddings.
//!
//! Every endpoint takes one string or an array of strings and answers with one entry per text,
//! in order, even for a single string.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use flotilla_shared::manifest::Task;
use flotilla_shared::tensor::{Dim, Tensor, TensorData};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::batch::DEADLINE_HEADER;
use super::error::{ApiError, JsonBody};
use super::run::{self, TOKENIZATION_TIME};
use super::ApiState;
use crate::runtime::RuntimeError;
use crate::serving::{Lease, ServedModel};

/// One text or an array of texts.
#[derive(Debug, Clone, PartialEq)]
pub struct Texts(pub Vec<String>);

impl<'de> Deserialize<'de> for Texts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextsVisitor;

        impl<'de> Visitor<'de> for TextsVisitor {
            type Value = Texts;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings (token arrays are not supported)")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Texts, E> {
                Ok(Texts(vec![text.to_owned()]))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<Texts, E> {
                Ok(Texts(vec![text]))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Texts, A::Error> {
                let mut texts = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(text) = seq.next_element::<TextElement>()? {
                    texts.push(text.0);
                }
                Ok(Texts(texts))
            }
        }

        deserializer.deserialize_any(TextsVisitor)
    }
}

/// An array element that must be a string.
struct TextElement(String);

impl<'de> Deserialize<'de> for TextElement {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ElementVisitor;

        impl Visitor<'_> for ElementVisitor {
            type Value = TextElement;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string (token arrays are not supported)")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<TextElement, E> {
                Ok(TextElement(text.to_owned()))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<TextElement, E> {
                Ok(TextElement(text))
            }
        }

        deserializer.deserialize_any(ElementVisitor)
    }
}

/// Refuses empty batches and batches over `api.max_batch_items`.
fn check_texts(texts: &Texts, max: usize) -> Result<(), ApiError> {
    if texts.0.is_empty() {
        return Err(ApiError::BadRequest("no texts given".into()));
    }
    if texts.0.len() > max {
        return Err(ApiError::TooManyItems {
            count: texts.0.len(),
            what: "texts",
            max,
        });
    }
    Ok(())
}

/// Takes the model and an inference slot, and checks the model can answer `endpoint`.
fn lease_for(
    state: &ApiState,
    endpoint: &'static str,
    task: Option<Task>,
) -> Result<Lease, ApiError> {
    let model = model_for(state, endpoint, task)?;
    Ok(state.slot.lease(model)?)
}

/// Takes the current model and checks it can answer `endpoint`.
fn model_for(
    state: &ApiState,
    endpoint: &'static str,
    task: Option<Task>,
) -> Result<Arc<ServedModel>, ApiError> {
    let model = state
        .slot
        .current()
        .ok_or(crate::serving::AcquireError::NoModel)?;
    let actual = model.model.meta().task;
    let fits = match task {
        Some(task) => actual == task,
        None => actual != Task::Raw,
    };
    if !fits {
        let needed = match task {
            Some(Task::Embedding) => "an embedding model",
            Some(Task::Classification) => "a classification model",
            _ => "a text model",
        };
        return Err(ApiError::WrongTask {
            actual,
            endpoint,
            needed,
        });
    }
    Ok(model)
}

/// Rows of an `[n, k]` FP32 task tensor.
fn rows(tensor: &Tensor) -> Result<Vec<Vec<f32>>, ApiError> {
    let (TensorData::Fp32(values), [_, width]) = (&tensor.data, tensor.shape.as_slice()) else {
        return Err(ApiError::Task(format!(
            "the text pipeline returned {} {:?}, not FP32 [n, k]",
            tensor.datatype(),
            tensor.shape
        )));
    };
    Ok(values
        .chunks((*width).max(1))
        .map(<[f32]>::to_vec)
        .collect())
}

/// `POST /v1/tokenize` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    /// Text(s) to tokenise; `inputs` is accepted too, as TEI names it.
    #[serde(alias = "inputs")]
    pub text: Texts,
}

/// One text's tokens.
#[derive(Debug, Serialize)]
pub struct Tokenized {
    /// Token ids, special tokens included, no padding.
    pub ids: Vec<u32>,
    /// Token strings.
    pub tokens: Vec<String>,
    /// `[start, end)` byte offsets of each token in the text (`[0, 0]` for special tokens).
    pub offsets: Vec<(usize, usize)>,
    /// Whether the text was cut to the model's maximum length.
    pub truncated: bool,
}

/// `POST /v1/tokenize`: `{"text": "..." | ["...", ...]}` → `[{ids, tokens, offsets,
/// truncated}, ...]`, applying the bundle's truncation policy.
pub async fn tokenize(
    State(state): State<ApiState>,
    JsonBody(request): JsonBody<TokenizeRequest>,
) -> Result<Response, ApiError> {
    check_texts(&request.text, state.config.max_batch_items)?;
    let lease = lease_for(&state, "/v1/tokenize", None)?;
    let texts = request.text.0;
    let ran = run::uncounted(lease, move |model| {
        let task = model.model.meta().task;
        let text = model.model.text().ok_or(RuntimeError::NotText(task))?;
        let started = Instant::now();
        let batch = text.encode(&texts)?;
        Ok((batch, started.elapsed()))
    })
    .await?;
    let (batch, took) = ran.value;

    let mut headers = HeaderMap::new();
    headers.insert(TOKENIZATION_TIME, run::millis(took));
    let truncated = batch.truncated.iter().filter(|t| **t).count();
    headers.insert(run::TRUNCATED, truncated.into());
    let body: Vec<Tokenized> = batch
        .ids
        .into_iter()
        .zip(batch.tokens)
        .zip(batch.offsets)
        .zip(batch.truncated)
        .map(|(((ids, tokens), offsets), truncated)| Tokenized {
            ids,
            tokens,
            offsets,
            truncated,
        })
        .collect();
    Ok((headers, Json(body)).into_response())
}

/// `POST /v1/embed` and `POST /v1/classify` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputsRequest {
    /// Text(s) to run.
    pub inputs: Texts,
}

/// The deadline a request carries in `x-flotilla-deadline-ms`, counted from now.
fn deadline(headers: &HeaderMap) -> Result<Option<Instant>, ApiError> {
    let Some(value) = headers.get(DEADLINE_HEADER) else {
        return Ok(None);
    };
    let millis: u64 = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{DEADLINE_HEADER} must be a whole number of milliseconds"
            ))
        })?;
    Ok(Some(
        Instant::now() + std::time::Duration::from_millis(millis),
    ))
}

/// Requests with at most this many bytes of text are tokenised on the async worker.
const INLINE_TOKENIZE_BYTES: usize = 1024;

/// Runs texts through the model's text pipeline, batched with concurrent requests unless
/// batching is off, and counts the request in the metrics.
async fn run_texts(
    state: &ApiState,
    model: Arc<ServedModel>,
    texts: Vec<String>,
    deadline: Option<Instant>,
) -> Result<run::TextRun, ApiError> {
    if !state.batcher.enabled() {
        let lease = state.slot.lease(model)?;
        let ran = run::counted(&state.metrics, lease, move |model| {
            Ok(run::run_texts(model, &texts)?)
        })
        .await?;
        return Ok(ran.value);
    }

    let admission = state.batcher.admit()?;
    let started = Instant::now();
    let _in_flight = state.metrics.start(&model);
    let result = batched(state, admission, model.clone(), texts, deadline).await;
    let outcome = result.as_ref().map(|_| ());
    run::record(&state.metrics, &model, outcome, started.elapsed());
    result
}

async fn batched(
    state: &ApiState,
    admission: super::batch::Admission,
    model: Arc<ServedModel>,
    texts: Vec<String>,
    deadline: Option<Instant>,
) -> Result<run::TextRun, ApiError> {
    let text_bytes: usize = texts.iter().map(String::len).sum();
    // Tokenising is CPU work of its own; it runs beside the batch in progress. A short
    // request is tokenised in place (tens of microseconds, less than a hop to a blocking
    // thread and back costs); anything longer goes to a blocking thread.
    let tokenizing = model.clone();
    let encode = move || {
        let meta = tokenizing.model.meta();
        let text = tokenizing
            .model
            .text()
            .ok_or(RuntimeError::NotText(meta.task))?;
        let started = Instant::now();
        let batch = text.encode(&texts)?;
        Ok::<_, RuntimeError>((batch, started.elapsed()))
    };
    let (batch, tokenize) = if text_bytes <= INLINE_TOKENIZE_BYTES {
        encode()?
    } else {
        tokio::task::spawn_blocking(encode)
            .await
            .map_err(|e| ApiError::Task(e.to_string()))??
    };

    let answer = state
        .batcher
        .run(admission, model, batch.clone(), deadline)
        .await?;
    Ok(run::TextRun {
        output: answer.output,
        batch,
        tokenize,
        infer: answer.infer,
        queued: answer.queued,
        batch_texts: answer.batch_texts,
    })
}

/// `POST /v1/embed`: `{"inputs": "..." | [...]}` → `[[f32, ...], ...]`, one vector per text.
pub async fn embed(
    State(state): State<ApiState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<InputsRequest>,
) -> Result<Response, ApiError> {
    check_texts(&request.inputs, state.config.max_batch_items)?;
    let deadline = deadline(&headers)?;
    let model = model_for(&state, "/v1/embed", Some(Task::Embedding))?;
    let ran = run_texts(&state, model, request.inputs.0, deadline).await?;
    let vectors = rows(&ran.output)?;
    Ok((ran.headers(), Json(vectors)).into_response())
}

/// One label's probability.
#[derive(Debug, Serialize)]
pub struct LabelScore {
    /// Class label.
    pub label: String,
    /// Probability, summing to 1 over the labels of one text.
    pub score: f32,
}

/// `POST /v1/classify`: `{"inputs": "..." | [...]}` → `[[{label, score}, ...], ...]`, labels
/// sorted by score, highest first.
pub async fn classify(
    State(state): State<ApiState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<InputsRequest>,
) -> Result<Response, ApiError> {
    check_texts(&request.inputs, state.config.max_batch_items)?;
    let deadline = deadline(&headers)?;
    let model = model_for(&state, "/v1/classify", Some(Task::Classification))?;
    let ran = run_texts(&state, model.clone(), request.inputs.0, deadline).await?;
    let labels = &model.model.meta().labels;
    let scored: Vec<Vec<LabelScore>> = rows(&ran.output)?
        .into_iter()
        .map(|row| {
            let mut scores: Vec<LabelScore> = labels
                .iter()
                .zip(row)
                .map(|(label, score)| LabelScore {
                    label: label.clone(),
                    score,
                })
                .collect();
            scores.sort_by(|a, b| b.score.total_cmp(&a.score));
            scores
        })
        .collect();
    Ok((ran.headers(), Json(scored)).into_response())
}

/// `POST /v1/embeddings` body (OpenAI). Unknown fields are ignored, as OpenAI clients add some.
#[derive(Debug, Deserialize)]
pub struct OpenAiEmbeddingsRequest {
    /// Must name the served model.
    pub model: String,
    /// Text(s) to embed.
    pub input: Texts,
    /// `float` (default) or `base64` (little-endian FP32 bytes).
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Accepted only when equal to the model's dimension; embeddings are never shortened.
    #[serde(default)]
    pub dimensions: Option<usize>,
}

/// An embedding as OpenAI returns it: numbers, or base64 of little-endian FP32.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum EmbeddingValue {
    /// `encoding_format: "float"`.
    Float(Vec<f32>),
    /// `encoding_format: "base64"`.
    Base64(String),
}

/// One entry of `data`.
#[derive(Debug, Serialize)]
pub struct OpenAiEmbedding {
    /// Always `embedding`.
    pub object: &'static str,
    /// Position of the text in `input`.
    pub index: usize,
    /// The vector.
    pub embedding: EmbeddingValue,
}

/// Token counts, special tokens included.
#[derive(Debug, Serialize)]
pub struct Usage {
    /// Tokens the model read.
    pub prompt_tokens: usize,
    /// Same as `prompt_tokens`; embeddings generate nothing.
    pub total_tokens: usize,
}

/// `POST /v1/embeddings` response.
#[derive(Debug, Serialize)]
pub struct OpenAiEmbeddingsResponse {
    /// Always `list`.
    pub object: &'static str,
    /// One entry per text, in order.
    pub data: Vec<OpenAiEmbedding>,
    /// The served model's name.
    pub model: String,
    /// Token counts.
    pub usage: Usage,
}

/// `POST /v1/embeddings` (OpenAI-compatible). A `model` other than the served one is 404.
pub async fn openai_embeddings(
    State(state): State<ApiState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<OpenAiEmbeddingsRequest>,
) -> Result<Response, ApiError> {
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "encoding_format {other:?} is not supported; use \"float\" or \"base64\""
            )))
        }
    };
    check_texts(&request.input, state.config.max_batch_items)?;
    let deadline = deadline(&headers)?;
    let model = model_for(&state, "/v1/embeddings", Some(Task::Embedding))?;
    if request.model != model.name() {
        return Err(ApiError::ModelNotFound(format!(
            "model {:?} is not served here; this agent serves {:?}",
            request.model,
            model.name()
        )));
    }
    if let Some(asked) = request.dimensions {
        let width = embedding_width(&model);
        if width != Some(asked) {
            let width = width.map_or_else(|| "variable".to_owned(), |w| w.to_string());
            return Err(ApiError::BadRequest(format!(
                "{} produces embeddings of dimension {width}; dimensions={asked} is not \
                 supported",
                model.name()
            )));
        }
    }
    let ran = run_texts(&state, model.clone(), request.input.0, deadline).await?;
    let vectors = rows(&ran.output)?;

    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| OpenAiEmbedding {
            object: "embedding",
            index,
            embedding: if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
                EmbeddingValue::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                EmbeddingValue::Float(vector)
            },
        })
        .collect();
    let tokens = ran.batch.token_count();
    let body = OpenAiEmbeddingsResponse {
        object: "list",
        data,
        model: model.name().to_owned(),
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    };
    Ok((ran.headers(), Json(body)).into_response())
}

/// The embedding dimension: the last, fixed dimension of the graph output the pipeline pools.
fn embedding_width(model: &ServedModel) -> Option<usize> {
    let meta = model.model.meta();
    let output = &meta.text.as_ref()?.output;
    let spec = meta.outputs.iter().find(|o| o.name == *output)?;
    match spec.shape.last()? {
        Dim::Fixed(n) => usize::try_from(*n).ok(),
        Dim::Symbol(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_take_a_string_or_an_array_of_strings_only() {
        let one: Texts = serde_json::from_str(r#""hi""#).unwrap();
        assert_eq!(one.0, ["hi"]);
        let many: Texts = serde_json::from_str(r#"["a", "今天"]"#).unwrap();
        assert_eq!(many.0, ["a", "今天"]);
        for bad in ["[1, 2]", "[[1, 2]]", "3", "null", r#"{"a": 1}"#] {
            let err = serde_json::from_str::<Texts>(bad).unwrap_err().to_string();
            assert!(
                err.contains("token arrays are not supported"),
                "{bad}: {err}"
            );
        }
    }
}
