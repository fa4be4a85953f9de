//! The agent's local HTTP API: Open Inference Protocol v2, text endpoints, and metrics.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | `/v2/health/live` | 200 `{"live": true}` |
//! | GET | `/v2/health/ready` | 200 `{"ready": true}` with a model, 503 before |
//! | GET | `/v2` | `{"name": "flotilla", "version", "extensions": ["binary_tensor_data"]}` |
//! | GET | `/v2/models/{name}[/versions/{version}]` | model metadata |
//! | GET | `/v2/models/{name}[/versions/{version}]/ready` | 200 `{"name", "ready": true}` |
//! | POST | `/v2/models/{name}[/versions/{version}]/infer` | inference, JSON or binary tensors |
//! | POST | `/v1/tokenize` | `{"text"}` → `[{ids, tokens, offsets, truncated}]` |
//! | POST | `/v1/embed` | `{"inputs"}` → `[[f32]]` |
//! | POST | `/v1/classify` | `{"inputs"}` → `[[{label, score}]]` |
//! | POST | `/v1/embeddings` | OpenAI embeddings |
//! | GET | `/metrics` | Prometheus text format 0.0.4 |
//!
//! Every error is `{"error": "<message>"}`: 400 bad input, 404 unknown model, version or route,
//! 405 wrong method, 413 body over `api.max_body_bytes` or batch over `api.max_batch_items`,
//! 415 compressed body, 429 with `Retry-After: 1` when every inference slot is busy or the
//! batching queue is full, 500 model failure, 503 no model loaded yet or (with `Retry-After`)
//! a deadline given in `x-flotilla-deadline-ms` passed before the request could run.

mod batch;
mod binary;
mod error;
mod run;
mod text;
mod v2;

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;

pub use batch::{Batcher, DEADLINE_HEADER};
pub use error::ApiError;
pub use run::{BATCH_SIZE, INFERENCE_TIME, QUEUE_TIME, TOKENIZATION_TIME, TRUNCATED};

use crate::config::ApiConfig;
use crate::metrics::{Metrics, CONTENT_TYPE};
use crate::serving::ModelSlot;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The served model and the inference concurrency limit.
    pub slot: Arc<ModelSlot>,
    /// Where requests are counted.
    pub metrics: Arc<Metrics>,
    /// Body and batch limits.
    pub config: ApiConfig,
    /// Batches concurrent text requests.
    pub batcher: Arc<Batcher>,
}

impl ApiState {
    /// The state for `slot`, with a batcher configured by `config.batching`.
    pub fn new(slot: Arc<ModelSlot>, metrics: Arc<Metrics>, config: ApiConfig) -> Self {
        let batcher = Arc::new(Batcher::new(config.batching.clone()));
        Self {
            slot,
            metrics,
            config,
            batcher,
        }
    }
}

/// The API's routes. The caller binds the listener, adds timeouts and shuts down gracefully.
pub fn router(state: ApiState) -> Router {
    let model_routes = Router::new()
        .route("/v2/models/{name}", get(v2::model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(v2::model_metadata),
        )
        .route("/v2/models/{name}/ready", get(v2::model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(v2::model_ready),
        )
        .route("/v2/models/{name}/infer", post(v2::infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(v2::infer),
        );

    Router::new()
        .route("/v2/health/live", get(v2::live))
        .route("/v2/health/ready", get(v2::ready))
        .route("/v2", get(v2::server_metadata))
        .merge(model_routes)
        .route("/v1/tokenize", post(text::tokenize))
        .route("/v1/embed", post(text::embed))
        .route("/v1/classify", post(text::classify))
        .route("/v1/embeddings", post(text::openai_embeddings))
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_route)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// `GET /metrics`.
async fn metrics(State(state): State<ApiState>) -> Response {
    if let Some(model) = state.slot.current() {
        state.metrics.observe_engine(&model);
    }
    let mut response = state.metrics.render().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

async fn no_route(request: Request) -> ApiError {
    ApiError::Route {
        status: StatusCode::NOT_FOUND,
        message: format!("no route for {} {}", request.method(), request.uri().path()),
    }
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::Route {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    }
}

/// Counts every response by route template, so the label set stays bounded.
async fn count_responses(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    state
        .metrics
        .record_response(&endpoint, response.status().as_u16());
    response
}

/// Path parameters whose rejection is a JSON 400.
#[derive(Debug)]
pub struct PathParams<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| PathParams(value))
            .map_err(|rejection: PathRejection| {
                ApiError::BadRequest(rejection.body_text().to_lowercase())
            })
    }
}
