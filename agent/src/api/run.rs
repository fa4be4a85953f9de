//! Running a request on the model: the lease, the blocking thread, timing, and the one place
//! that records each inference in the metrics and the log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use flotilla_shared::tensor::Tensor;
use tracing::warn;

use super::error::ApiError;
use crate::metrics::{Metrics, Outcome};
use crate::runtime::{RuntimeError, TextBatch};
use crate::serving::{Lease, ServedModel};

/// Response header: model execution time in milliseconds.
pub const INFERENCE_TIME: &str = "x-inference-time";
/// Response header: tokenisation time in milliseconds.
pub const TOKENIZATION_TIME: &str = "x-tokenization-time";
/// Response header: time the request waited in the batching queue, in milliseconds.
pub const QUEUE_TIME: &str = "x-queue-time";
/// Response header: texts in the batch the request ran in (its own included).
pub const BATCH_SIZE: &str = "x-flotilla-batch-size";
/// Response header: how many texts were cut to the model's maximum length.
pub const TRUNCATED: &str = "x-flotilla-truncated";

/// What a job on the model produced, and the model it ran on.
#[derive(Debug)]
pub struct Ran<T> {
    /// The job's result.
    pub value: T,
    /// The model the job ran on (the lease's, even if the slot switched meanwhile).
    pub model: Arc<ServedModel>,
}

/// Runs `job` on the leased model on a blocking thread and records the outcome in the metrics.
///
/// The lease travels into the blocking thread and is dropped only when the job ends, so the
/// concurrency limit covers the real work and a model switch lets this job finish on the model
/// it started on.
pub async fn counted<T, F>(metrics: &Arc<Metrics>, lease: Lease, job: F) -> Result<Ran<T>, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&ServedModel) -> Result<T, ApiError> + Send + 'static,
{
    let model = lease.model.clone();
    let started = lease.started;
    let recorder = metrics.clone();
    let span = inference_span(&model);
    let joined = tokio::task::spawn_blocking(move || {
        let _span = span.entered();
        let _in_flight = recorder.start(&lease.model);
        let result = job(&lease.model);
        record(
            &recorder,
            &lease.model,
            result.as_ref().map(|_| ()),
            started.elapsed(),
        );
        result
    })
    .await;

    match joined {
        Ok(result) => result.map(|value| Ran { value, model }),
        Err(join) => {
            let error = ApiError::Task(join_reason(&join));
            record(metrics, &model, Err(&error), started.elapsed());
            Err(error)
        }
    }
}

/// Runs `job` on the leased model on a blocking thread without counting it as an inference
/// (tokenisation only); it still holds an inference slot, since it uses CPU the same way.
pub async fn uncounted<T, F>(lease: Lease, job: F) -> Result<Ran<T>, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&ServedModel) -> Result<T, ApiError> + Send + 'static,
{
    let model = lease.model.clone();
    let span = inference_span(&model);
    let joined = tokio::task::spawn_blocking(move || {
        let _span = span.entered();
        job(&lease.model)
    })
    .await;
    match joined {
        Ok(result) => result.map(|value| Ran { value, model }),
        Err(join) => Err(ApiError::Task(join_reason(&join))),
    }
}

/// The span every blocking job runs in, naming the model it runs on; created on the request's
/// task so it nests under the request's span.
fn inference_span(model: &ServedModel) -> tracing::Span {
    tracing::debug_span!("inference", model = model.name(), version = %model.version())
}

fn join_reason(join: &tokio::task::JoinError) -> String {
    if join.is_panic() {
        "the model panicked while running".to_owned()
    } else {
        "the task was cancelled".to_owned()
    }
}

/// Counts one finished inference and logs model-side failures; the only place that does either.
pub(super) fn record(
    metrics: &Metrics,
    model: &ServedModel,
    result: Result<(), &ApiError>,
    elapsed: Duration,
) {
    let outcome = match result {
        Ok(_) => Outcome::Success,
        Err(e) if e.is_model_error() => Outcome::ModelError,
        Err(_) => Outcome::ClientError,
    };
    metrics.record(model, outcome, elapsed);
    if let Err(error) = result {
        if outcome == Outcome::ModelError {
            warn!(model = model.name(), version = %model.version(), %error, "inference failed");
        }
    }
}

/// A text batch run through tokenizer, model and post-processing, with each stage timed.
#[derive(Debug)]
pub struct TextRun {
    /// `embeddings` or `probabilities`, [n, k].
    pub output: Tensor,
    /// The tokenised batch.
    pub batch: TextBatch,
    /// Time spent tokenising.
    pub tokenize: Duration,
    /// Time spent in the model and post-processing (the whole batch's, when batched).
    pub infer: Duration,
    /// Time spent waiting for a batch; zero when run alone.
    pub queued: Duration,
    /// Texts in the batch the request ran in.
    pub batch_texts: usize,
}

impl TextRun {
    /// Timing and truncation headers for this run.
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(TOKENIZATION_TIME, millis(self.tokenize));
        headers.insert(INFERENCE_TIME, millis(self.infer));
        headers.insert(QUEUE_TIME, millis(self.queued));
        headers.insert(BATCH_SIZE, HeaderValue::from(self.batch_texts));
        let truncated = self.batch.truncated.iter().filter(|t| **t).count();
        headers.insert(TRUNCATED, HeaderValue::from(truncated));
        headers
    }
}

/// The same pipeline as [`crate::runtime::Model::run_texts`], in its public steps so each stage
/// can be timed and the tokenised batch reported.
pub fn run_texts(model: &ServedModel, texts: &[String]) -> Result<TextRun, RuntimeError> {
    let meta = model.model.meta();
    let text = model.model.text().ok_or(RuntimeError::NotText(meta.task))?;

    let started = Instant::now();
    let batch = text.encode(texts)?;
    let tokenize = started.elapsed();

    let started = Instant::now();
    let inputs = text.model_inputs(&batch, &meta.inputs)?;
    let outputs = model.model.infer(inputs)?;
    let output = text.postprocess(meta, &batch, outputs)?;
    let infer = started.elapsed();

    Ok(TextRun {
        output,
        batch_texts: batch.len(),
        batch,
        tokenize,
        infer,
        queued: Duration::ZERO,
    })
}

/// A duration as a header value in milliseconds with microsecond precision, e.g. `1.234`.
pub fn millis(duration: Duration) -> HeaderValue {
    let text = format!("{:.3}", duration.as_secs_f64() * 1000.0);
    HeaderValue::from_str(&text).expect("invariant: a formatted number is a valid header value")
}
