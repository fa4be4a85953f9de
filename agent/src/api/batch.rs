//! Dynamic batching for the text endpoints: concurrent requests are tokenised on their own,
//! queued, and run together in batches bounded by a padded-token budget, each batch padded to
//! its own widest text; every caller gets its own rows back, in order.
//!
//! Like TEI, the batcher does not hold a lone request back: a batch forms from whatever is
//! queued when the model is free, and it waits (at most `max_wait_ms`) only while requests
//! already admitted are still being tokenised. Requests queue while a batch runs, so under
//! load batches fill by themselves. The queue is bounded (`max_queue`: more get 429), and a
//! request may carry a deadline after which it is answered 503 instead of being run.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use flotilla_shared::tensor::{Tensor, TensorData};
use tokio::sync::{oneshot, Notify};
use tracing::{debug_span, Instrument};

use super::error::ApiError;
use crate::config::BatchingConfig;
use crate::runtime::{RuntimeError, TextBatch};
use crate::serving::ServedModel;

/// Request header: how long the caller will wait, in milliseconds from arrival.
pub const DEADLINE_HEADER: &str = "x-flotilla-deadline-ms";

/// What one request gets back from its batch.
#[derive(Debug)]
pub struct BatchAnswer {
    /// This request's rows: `embeddings` or `probabilities`, [n, k].
    pub output: Tensor,
    /// Time from entering the queue to its batch starting.
    pub queued: Duration,
    /// Time the whole batch spent in the model and post-processing.
    pub infer: Duration,
    /// Texts in the batch this request ran in.
    pub batch_texts: usize,
}

struct Job {
    model: Arc<ServedModel>,
    batch: TextBatch,
    enqueued: Instant,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<BatchAnswer, ApiError>>,
    _waiting: Waiting,
}

/// Counts a job from queueing until it is answered or dropped.
struct Waiting(Arc<Shared>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Job {
    fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| d <= now) || self.reply.is_closed()
    }
}

struct Shared {
    config: BatchingConfig,
    queue: Mutex<VecDeque<Job>>,
    /// Admitted requests not yet queued (being tokenised).
    arriving: AtomicUsize,
    /// Queued requests and those in the forming or running batch.
    waiting: AtomicUsize,
    wake: Notify,
    closed: AtomicBool,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, VecDeque<Job>> {
        // A queue of jobs stays valid whatever a panicking holder was doing.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The text endpoints' batcher; its worker task starts with the first request and ends when
/// the last handle is dropped.
pub struct Batcher {
    shared: Arc<Shared>,
    worker: OnceLock<()>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
    }
}

/// A place in the queue, held from admission until the request is queued or gives up.
pub struct Admission {
    shared: Arc<Shared>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.shared.arriving.fetch_sub(1, Ordering::SeqCst);
        // The worker may be waiting for this arrival.
        self.shared.wake.notify_one();
    }
}

impl Batcher {
    /// A batcher with `config`; nothing runs until the first request.
    pub fn new(config: BatchingConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                queue: Mutex::new(VecDeque::new()),
                arriving: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                wake: Notify::new(),
                closed: AtomicBool::new(false),
            }),
            worker: OnceLock::new(),
        }
    }

    /// Requests queued or in a batch, not yet answered.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::SeqCst)
    }

    /// Whether requests are batched at all.
    pub fn enabled(&self) -> bool {
        self.shared.config.enabled
    }

    /// Takes a place in the queue, or refuses when it is full.
    pub fn admit(&self) -> Result<Admission, ApiError> {
        let max = self.shared.config.max_queue;
        let taken = self.shared.arriving.fetch_add(1, Ordering::SeqCst);
        let admission = Admission {
            shared: self.shared.clone(),
        };
        if taken + self.shared.queue().len() >= max {
            return Err(ApiError::QueueFull { max });
        }
        Ok(admission)
    }

    /// Queues a tokenised request and waits for its rows, or for its deadline.
    pub async fn run(
        &self,
        admission: Admission,
        model: Arc<ServedModel>,
        batch: TextBatch,
        deadline: Option<Instant>,
    ) -> Result<BatchAnswer, ApiError> {
        self.start_worker();
        let (reply, answer) = oneshot::channel();
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        let waiting = Waiting(self.shared.clone());
        self.shared.queue().push_back(Job {
            model,
            batch,
            enqueued: Instant::now(),
            deadline,
            reply,
            _waiting: waiting,
        });
        drop(admission);

        let answer = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), answer)
                .await
                .map_err(|_| ApiError::DeadlineExceeded)?,
            None => answer.await,
        };
        answer.map_err(|_| ApiError::Task("the batch worker stopped".into()))?
    }

    fn start_worker(&self) {
        self.worker.get_or_init(|| {
            let shared = self.shared.clone();
            tokio::spawn(worker(shared).instrument(debug_span!("batcher")));
        });
    }
}

/// Forms a batch, runs it on a blocking thread, answers its callers; one batch at a time, so
/// requests arriving meanwhile gather into the next.
async fn worker(shared: Arc<Shared>) {
    loop {
        let Some(jobs) = next_batch(&shared).await else {
            return;
        };
        let (jobs, result) = tokio::task::spawn_blocking(move || {
            let result = run_batch(&jobs);
            (jobs, result)
        })
        .await
        .unwrap_or_else(|join| {
            // The jobs went down with the panicking thread; their callers see a closed channel.
            tracing::warn!(error = %join, "batch panicked");
            (
                Vec::new(),
                Err(RuntimeError::Run("the batch panicked".into())),
            )
        });
        answer(jobs, result);
    }
}

/// Waits for work, then takes jobs of one model up to the token budget; waits up to
/// `max_wait_ms` more only while admitted requests are still on their way.
async fn next_batch(shared: &Shared) -> Option<Vec<Job>> {
    loop {
        if shared.closed.load(Ordering::SeqCst) && shared.queue().is_empty() {
            return None;
        }
        let notified = shared.wake.notified();
        if !shared.queue().is_empty() {
            break;
        }
        notified.await;
    }

    let formed = Instant::now();
    let max_wait = Duration::from_millis(shared.config.max_wait_ms);
    let mut jobs: Vec<Job> = Vec::new();
    loop {
        // Read before taking: a request is queued before it gives up its admission, so when
        // none are arriving here, the take below sees every request admitted so far. Read
        // after, a request could queue and leave between the two and miss this batch.
        let arriving = shared.arriving.load(Ordering::SeqCst) > 0;
        let full = take(shared, &mut jobs);
        let waited = formed.elapsed();
        if full || !arriving || waited >= max_wait {
            if !jobs.is_empty() {
                return Some(jobs);
            }
            if shared.queue().is_empty() {
                // Everything queued had expired; wait for new work.
                return Box::pin(next_batch(shared)).await;
            }
            continue;
        }
        let notified = shared.wake.notified();
        let _ = tokio::time::timeout(max_wait - waited, notified).await;
    }
}

/// Moves queued jobs into `jobs` while they fit the budget; answers expired ones. Returns
/// whether the batch is full.
fn take(shared: &Shared, jobs: &mut Vec<Job>) -> bool {
    let budget = shared.config.max_batch_tokens;
    let now = Instant::now();
    let mut queue = shared.queue();
    let (mut rows, mut width) = jobs.iter().fold((0, 0), |(r, w), j| {
        (r + j.batch.len(), w.max(j.batch.width()))
    });
    let mut index = 0;
    while index < queue.len() {
        let job = &queue[index];
        if job.expired(now) {
            let job = queue.remove(index).expect("invariant: index is in range");
            let _ = job.reply.send(Err(ApiError::DeadlineExceeded));
            continue;
        }
        let same_model = jobs
            .first()
            .is_none_or(|first| first.model.digest == job.model.digest);
        if !same_model {
            index += 1; // another model's request waits for a batch of its own
            continue;
        }
        let padded = (rows + job.batch.len()) * width.max(job.batch.width());
        if !jobs.is_empty() && padded > budget {
            return true;
        }
        rows += job.batch.len();
        width = width.max(job.batch.width());
        jobs.push(queue.remove(index).expect("invariant: index is in range"));
    }
    rows * width >= budget
}

/// One model run over every job's texts, padded to the widest.
fn run_batch(jobs: &[Job]) -> Result<(Tensor, Duration), RuntimeError> {
    let model = &jobs[0].model;
    let meta = model.model.meta();
    let text = model.model.text().ok_or(RuntimeError::NotText(meta.task))?;
    let mut batch = TextBatch {
        ids: Vec::new(),
        type_ids: Vec::new(),
        tokens: Vec::new(),
        offsets: Vec::new(),
        truncated: Vec::new(),
    };
    for job in jobs {
        batch.ids.extend_from_slice(&job.batch.ids);
        batch.type_ids.extend_from_slice(&job.batch.type_ids);
        batch.truncated.extend_from_slice(&job.batch.truncated);
    }

    let started = Instant::now();
    let inputs = text.model_inputs(&batch, &meta.inputs)?;
    let outputs = model.model.infer(inputs)?;
    let output = text.postprocess(meta, &batch, outputs)?;
    Ok((output, started.elapsed()))
}

/// Splits the batch's rows back to each caller, in order.
fn answer(jobs: Vec<Job>, result: Result<(Tensor, Duration), RuntimeError>) {
    let batch_texts: usize = jobs.iter().map(|j| j.batch.len()).sum();
    let (output, infer) = match result {
        Ok(done) => done,
        Err(error) => {
            let message = error.to_string();
            for job in jobs {
                let _ = job
                    .reply
                    .send(Err(ApiError::Runtime(RuntimeError::Run(message.clone()))));
            }
            return;
        }
    };
    let width = output.shape.get(1).copied().unwrap_or(0);
    let TensorData::Fp32(values) = output.data else {
        for job in jobs {
            let _ = job
                .reply
                .send(Err(ApiError::Task("the batch output is not FP32".into())));
        }
        return;
    };
    let started = Instant::now() - infer;
    let mut offset = 0;
    for job in jobs {
        let rows = job.batch.len();
        let data = values[offset * width..(offset + rows) * width].to_vec();
        offset += rows;
        let output = Tensor::new(
            output.name.clone(),
            vec![rows, width],
            TensorData::Fp32(data),
        )
        .map_err(|e| ApiError::Task(e.to_string()));
        let answer = output.map(|output| BatchAnswer {
            output,
            queued: started.saturating_duration_since(job.enqueued),
            infer,
            batch_texts,
        });
        let _ = job.reply.send(answer);
    }
}
