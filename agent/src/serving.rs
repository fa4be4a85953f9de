//! The model being served and the atomic switch between versions.
//!
//! Requests take an `Arc` of the current [`ServedModel`] when they start, so an activation that
//! swaps the slot lets requests in flight finish on the old model while new ones go to the new
//! one. Inference runs on blocking threads behind a semaphore that bounds concurrency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use flotilla_shared::manifest::Manifest;
use flotilla_shared::wire::ActiveModel;
use flotilla_shared::Sha256Digest;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::runtime::Model;

/// A loaded, verified, self-tested model and what identifies it.
#[derive(Debug)]
pub struct ServedModel {
    /// The runtime model.
    pub model: Model,
    /// The bundle's manifest.
    pub manifest: Manifest,
    /// Bundle digest.
    pub digest: Sha256Digest,
    /// How long loading and optimising took.
    pub load_time: Duration,
}

impl ServedModel {
    /// Model name.
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// Model version as a string.
    pub fn version(&self) -> String {
        self.manifest.version.to_string()
    }

    /// What the agent reports as active.
    pub fn active(&self) -> ActiveModel {
        let info = self.model.info();
        ActiveModel {
            name: self.manifest.name.clone(),
            version: self.version(),
            digest: self.digest,
            backend: info.backend,
            provider: info.provider,
        }
    }
}

/// Why a request could not get a model to run on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    /// Nothing is loaded yet.
    #[error("no model is loaded yet")]
    NoModel,
    /// Every inference slot is busy.
    #[error("too many concurrent requests")]
    Busy,
}

/// The slot holding the active model, plus the concurrency limit on inference.
#[derive(Debug)]
pub struct ModelSlot {
    current: ArcSwapOption<ServedModel>,
    permits: Arc<Semaphore>,
    max_concurrency: usize,
}

/// A request's hold on a model and an inference slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Lease {
    /// The model this request runs on, even if the slot is switched meanwhile.
    pub model: Arc<ServedModel>,
    _permit: OwnedSemaphorePermit,
    /// When the lease was granted.
    pub started: Instant,
}

impl ModelSlot {
    /// An empty slot allowing `max_concurrency` inferences at once (at least one).
    pub fn new(max_concurrency: usize) -> Self {
        let max_concurrency = max_concurrency.max(1);
        Self {
            current: ArcSwapOption::empty(),
            permits: Arc::new(Semaphore::new(max_concurrency)),
            max_concurrency,
        }
    }

    /// The model being served, if any.
    pub fn current(&self) -> Option<Arc<ServedModel>> {
        self.current.load_full()
    }

    /// Makes `model` the one new requests get; returns the one it replaces.
    pub fn activate(&self, model: Arc<ServedModel>) -> Option<Arc<ServedModel>> {
        self.current.swap(Some(model))
    }

    /// Takes the current model and an inference slot without waiting.
    pub fn try_lease(&self) -> Result<Lease, AcquireError> {
        let model = self.current().ok_or(AcquireError::NoModel)?;
        self.lease(model)
    }

    /// Takes an inference slot for `model` without waiting.
    pub fn lease(&self, model: Arc<ServedModel>) -> Result<Lease, AcquireError> {
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| AcquireError::Busy)?;
        Ok(Lease {
            model,
            _permit: permit,
            started: Instant::now(),
        })
    }

    /// Requests running now.
    pub fn in_flight(&self) -> usize {
        self.max_concurrency - self.permits.available_permits()
    }

    /// The concurrency limit.
    pub fn max_concurrency(&self) -> usize {
        self.max_concurrency
    }

    /// Waits until no request holds a slot, or `timeout` passes; returns whether it drained.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let all = u32::try_from(self.max_concurrency).unwrap_or(u32::MAX);
        tokio::time::timeout(timeout, self.permits.acquire_many(all))
            .await
            .is_ok()
    }
}
