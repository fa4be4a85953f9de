//! The API's one error type, how each case maps to a status code and a `{"error": ...}` body,
//! and the JSON body extractor whose rejections use it.

use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use flotilla_shared::manifest::Task;
use serde::de::DeserializeOwned;

use super::ApiState;
use crate::runtime::RuntimeError;
use crate::serving::AcquireError;

/// Why a request failed. Every variant becomes a JSON body `{"error": "<message>"}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not valid JSON or does not have the expected fields (400).
    #[error("invalid request body: {0}")]
    InvalidBody(String),
    /// The request is well-formed but asks for something impossible (400).
    #[error("{0}")]
    BadRequest(String),
    /// The body could not be read; carries the status the reader chose (413 over the limit).
    #[error("{message}")]
    ReadBody {
        /// Status to answer with.
        status: StatusCode,
        /// What went wrong.
        message: String,
    },
    /// More texts or rows than `api.max_batch_items` (413).
    #[error("{count} {what} in one request exceed the limit of {max}")]
    TooManyItems {
        /// Texts or rows given.
        count: usize,
        /// `texts` or `rows`.
        what: &'static str,
        /// The configured limit.
        max: usize,
    },
    /// The request names a model or version this agent does not serve (404).
    #[error("{0}")]
    ModelNotFound(String),
    /// The endpoint needs another task than the model's (400).
    #[error("model task is {actual}; {endpoint} needs {needed}")]
    WrongTask {
        /// The model's task.
        actual: Task,
        /// The endpoint called.
        endpoint: &'static str,
        /// What the endpoint needs.
        needed: &'static str,
    },
    /// The runtime refused or failed; 400 for client errors, 500 otherwise.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// No model, or every inference slot is busy (503, 429).
    #[error(transparent)]
    Acquire(#[from] AcquireError),
    /// A request body encoding this server does not decode (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// No route matches (404) or the method is wrong (405).
    #[error("{message}")]
    Route {
        /// 404 or 405.
        status: StatusCode,
        /// Which path or method.
        message: String,
    },
    /// The inference failed outside the runtime's own errors: the blocking task panicked or was
    /// cancelled, or the model answered with something unusable (500).
    #[error("inference task failed: {0}")]
    Task(String),
    /// The batching queue is full.
    #[error("the inference queue is full ({max} requests); retry later")]
    QueueFull {
        /// Queue capacity.
        max: usize,
    },
    /// The request's deadline passed before its batch ran.
    #[error("the request's deadline passed before it could run")]
    DeadlineExceeded,
}

impl ApiError {
    /// The status code this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidBody(_) | Self::BadRequest(_) | Self::WrongTask { .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::ReadBody { status, .. } | Self::Route { status, .. } => *status,
            Self::TooManyItems { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::Runtime(e) if e.is_client_error() => StatusCode::BAD_REQUEST,
            Self::Runtime(_) | Self::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Acquire(AcquireError::NoModel) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Acquire(AcquireError::Busy) | Self::QueueFull { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }

    /// Whether the model or host is at fault, as opposed to the request.
    pub fn is_model_error(&self) -> bool {
        self.status().is_server_error()
            && !matches!(self, Self::Acquire(_) | Self::DeadlineExceeded)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::json!({ "error": self.to_string() });
        let mut response = (status, axum::Json(body)).into_response();
        let retry = matches!(
            self,
            Self::Acquire(AcquireError::Busy) | Self::QueueFull { .. } | Self::DeadlineExceeded
        );
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// Parses JSON with the path of the offending field in the message, e.g.
/// `inputs[0].datatype: unknown variant ...`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::InvalidBody(inner.to_string())
        } else {
            ApiError::InvalidBody(format!("{path}: {inner}"))
        }
    })?;
    deserializer
        .end()
        .map_err(|e| ApiError::InvalidBody(e.to_string()))?;
    Ok(value)
}

/// Reads the whole body within `api.max_body_bytes`, answering 413 over it.
pub async fn read_body(request: Request, state: &ApiState) -> Result<Bytes, ApiError> {
    Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            let status = rejection.status();
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!(
                    "request body exceeds the limit of {} bytes",
                    state.config.max_body_bytes
                )
            } else {
                rejection.body_text().to_lowercase()
            };
            ApiError::ReadBody { status, message }
        })
}

/// A JSON body whose rejections are `{"error": ...}` with 400 (malformed, wrong fields) or 413
/// (over `api.max_body_bytes`), instead of axum's plain-text 415/422. The `Content-Type` is not
/// checked, so clients that omit it still work.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<ApiState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &ApiState) -> Result<Self, Self::Rejection> {
        reject_encoded_body(&request)?;
        let bytes = read_body(request, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Refuses compressed bodies (415): this server does not decompress requests.
pub fn reject_encoded_body(request: &Request) -> Result<(), ApiError> {
    let Some(encoding) = request.headers().get(header::CONTENT_ENCODING) else {
        return Ok(());
    };
    let identity = encoding
        .to_str()
        .is_ok_and(|e| e.trim().eq_ignore_ascii_case("identity"));
    if identity {
        return Ok(());
    }
    Err(ApiError::UnsupportedMediaType(format!(
        "content-encoding {:?} is not supported; send the body uncompressed",
        String::from_utf8_lossy(encoding.as_bytes())
    )))
}
