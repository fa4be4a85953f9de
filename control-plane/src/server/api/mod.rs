//! The REST API under `/api/v1`, plus `/healthz`, `/readyz`, `/metrics` and the OpenAPI
//! document at `/api/v1/openapi.json`, generated from the handlers' annotations.
//!
//! Every `/api/v1` route but the OpenAPI document needs a bearer token; reads need `viewer`,
//! bundle uploads and rollout changes `operator`; forgetting an agent, backups and key sets
//! `admin`. Errors are
//! `{"error": "..."}` with 400 (bad input), 401 (no or unknown token), 403 (role too low),
//! 404, 409 (conflicts with the current state), 413 (upload too large) or 500.

mod auth;
mod views;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use flotilla_shared::SignedKeySet;
use serde::Deserialize;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use auth::BearerScheme;
pub use auth::{Admin, Caller, Operator, Tokens, Viewer};
pub use views::{phase_name, wave_index};
use views::{AgentView, EventsPage, FleetSummary, RolloutView, TrustView};

use super::hub::{Approval, Hub, HubError, PendingAgent, SignerScan, Steer};
use super::metrics::{ServerMetrics, CONTENT_TYPE};
use super::mqtt::MqttStats;
use super::registry::AgentRecord;
use super::store::{BundleRecord, EventRecord, Store};
use super::unix_ms;
use crate::rollout::{RolloutSpec, Selector};

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The server's state.
    pub hub: Arc<Mutex<Hub>>,
    /// The database, for flushing outside the hub's lock.
    pub store: Store,
    /// Known tokens.
    pub tokens: Arc<Tokens>,
    /// Metrics.
    pub metrics: Arc<ServerMetrics>,
    /// MQTT client counters.
    pub mqtt: Arc<MqttStats>,
    /// Largest accepted upload, bytes.
    pub max_upload_bytes: usize,
    /// Changes when the server stops, so long-lived answers (event streams) end.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl AppState {
    fn hub(&self) -> MutexGuard<'_, Hub> {
        self.hub.lock().expect("invariant: hub lock never poisoned")
    }
}

/// An error answer: a status and `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An error with a status and a message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        let status = match &e {
            HubError::Invalid(_) => StatusCode::BAD_REQUEST,
            HubError::NotFound(_) => StatusCode::NOT_FOUND,
            HubError::Conflict(_) => StatusCode::CONFLICT,
            HubError::Internal(e) => {
                tracing::error!(error = %format!("{e:#}"), "API request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Self::new(status, e.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        HubError::Internal(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
        }
        response
    }
}

/// Axum's `Query`, answering a query string that does not parse (`limit=ten`) with the
/// API's JSON error like every other refusal.
struct ApiQuery<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S>
    for ApiQuery<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(query)| Self(query))
            .map_err(|e| ApiError::new(e.status(), e.body_text()))
    }
}

/// `{"error": "..."}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Flotilla control plane",
        description = "Fleet registry, bundle distribution and staged rollouts for edge model serving."
    ),
    modifiers(&BearerScheme),
    tags(
        (name = "agents", description = "The fleet"),
        (name = "bundles", description = "Signed model bundles"),
        (name = "rollouts", description = "Staged rollouts"),
        (name = "events", description = "The event log"),
        (name = "trust", description = "Publisher key sets"),
        (name = "server", description = "The server itself"),
    )
)]
struct ApiDoc;

type ApiResult<T> = Result<T, ApiError>;

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let max_upload = state.max_upload_bytes;
    let (api, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_agents))
        .routes(routes!(get_agent, forget_agent))
        .routes(routes!(list_pending_agents))
        .routes(routes!(accept_agent))
        .routes(routes!(list_approved_agents))
        .routes(routes!(fleet_summary))
        .routes(routes!(list_bundles, upload_bundle))
        .routes(routes!(get_bundle))
        .routes(routes!(get_trust, add_key_set))
        .routes(routes!(list_rollouts, create_rollout))
        .routes(routes!(get_rollout))
        .routes(routes!(steer_rollout))
        .routes(routes!(list_events))
        .routes(routes!(stream_events))
        .routes(routes!(server_key))
        .routes(routes!(whoami))
        .routes(routes!(backup))
        .split_for_parts();
    let openapi = Arc::new(openapi);
    Router::new()
        .merge(api)
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || {
                let openapi = openapi.clone();
                async move { Json(openapi.as_ref().clone()) }
            }),
        )
        .route("/", axum::routing::get(dashboard))
        .route("/dashboard", axum::routing::get(dashboard))
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .route("/metrics", axum::routing::get(metrics))
        .layer(DefaultBodyLimit::max(max_upload))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Counts and times every request by route template.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    state.metrics.observe_request(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// The fleet dashboard: a static page that asks for a token and reads the API with it.
async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("dashboard.html"))
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready once the database is open (it is, if this runs) and the MQTT client is connected.
async fn readyz(State(state): State<AppState>) -> Response {
    if state.mqtt.connected.load(Ordering::SeqCst) {
        "ready".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to the MQTT broker",
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(&state.hub(), &state.mqtt);
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

// ---- agents ----------------------------------------------------------------------------

/// The most agents one page of `GET /agents` holds.
const MAX_AGENT_PAGE: usize = 1000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct AgentQuery {
    /// Label selector, e.g. `site=berlin,hw in (cpu,gpu)`.
    selector: Option<String>,
    /// Only agents connected (`true`) or not (`false`).
    online: Option<bool>,
    /// Only agents whose id sorts after this one: the last id of the previous page.
    after: Option<String>,
    /// At most this many (1-1000); default all.
    limit: Option<usize>,
}

/// A page of an id-ordered listing.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// Only entries whose id sorts after this one: the last id of the previous page.
    after: Option<String>,
    /// At most this many (1-1000); default all.
    limit: Option<usize>,
}

/// The page size `limit` asks for: everything when absent, else 1 to [`MAX_AGENT_PAGE`].
fn page_limit(limit: Option<usize>) -> ApiResult<usize> {
    match limit {
        None => Ok(usize::MAX),
        Some(limit @ 1..=MAX_AGENT_PAGE) => Ok(limit),
        Some(_) => Err(ApiError::bad_request(format!(
            "limit must be 1-{MAX_AGENT_PAGE}"
        ))),
    }
}

fn parse_selector(text: Option<&str>) -> ApiResult<Selector> {
    match text {
        None => Ok(Selector::everything()),
        Some(text) => text
            .parse()
            .map_err(|e| ApiError::bad_request(format!("bad selector {text:?}: {e}"))),
    }
}

/// Lists agents by id, optionally those a label selector matches or that are online (or
/// not). Paged with `limit` and `after`: pass the last id of a page as `after` for the next;
/// a page shorter than `limit` is the last.
#[utoipa::path(get, path = "/api/v1/agents", tag = "agents", params(AgentQuery),
    security(("bearer" = [])),
    responses((status = 200, body = Vec<AgentView>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn list_agents(
    Viewer(_): Viewer,
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<AgentQuery>,
) -> ApiResult<Json<Vec<AgentView>>> {
    let selector = parse_selector(query.selector.as_deref())?;
    let limit = page_limit(query.limit)?;
    let hub = state.hub();
    let keep = |a: &AgentRecord| {
        selector.matches(&a.labels) && query.online.is_none_or(|online| a.online == online)
    };
    Ok(Json(
        hub.agents_after(query.after.as_deref(), keep)
            .take(limit)
            .cloned()
            .map(|a| AgentView::new(a, &hub))
            .collect(),
    ))
}

/// One agent: identity, labels, capabilities, presence, health and metrics.
#[utoipa::path(get, path = "/api/v1/agents/{id}", tag = "agents",
    params(("id" = String, Path, description = "Agent id")), security(("bearer" = [])),
    responses((status = 200, body = AgentView), (status = 404, body = ErrorBody)))]
async fn get_agent(
    Viewer(_): Viewer,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<AgentView>> {
    let hub = state.hub();
    let record = hub.agent(&id)?;
    Ok(Json(AgentView::new(record, &hub)))
}

/// Forgets an offline agent that is in no active rollout (admin).
#[utoipa::path(delete, path = "/api/v1/agents/{id}", tag = "agents",
    params(("id" = String, Path, description = "Agent id")), security(("bearer" = [])),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn forget_agent(
    Admin(_): Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.hub().forget_agent(&id, unix_ms())?;
    state.store.flush().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Agents whose birth could not register: new ones while admission waits for an admin, and
/// known ones offering another key than the registered one. By id, paged like `/agents`.
#[utoipa::path(get, path = "/api/v1/pending-agents", tag = "agents", params(PageQuery),
    security(("bearer" = [])),
    responses((status = 200, body = Vec<PendingAgent>), (status = 400, body = ErrorBody)))]
async fn list_pending_agents(
    Viewer(_): Viewer,
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> ApiResult<Json<Vec<PendingAgent>>> {
    let limit = page_limit(query.limit)?;
    Ok(Json(
        state.hub().pending_agents(query.after.as_deref(), limit),
    ))
}

/// What an admin accepts: the key the pending agent must still offer.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AcceptBody {
    /// The offered key's id (64 hex digits), as `/api/v1/pending-agents` lists it.
    #[schema(value_type = String)]
    key_id: flotilla_shared::KeyId,
}

/// A key approved ahead and not used yet.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct ApprovedAgent {
    /// Agent id.
    id: String,
    /// The key id its first birth must offer, hex.
    key_id: String,
}

/// Registers the key a pending agent offers (admin; 200 with the agent): a known agent
/// offering a new key must be offline and in no active rollout, and joins anew. Any other key
/// is approved ahead (202): the next birth with it registers whatever the admission, one with
/// another key waits, and for a registered agent (a replacement device) it takes the id over
/// once the agent is offline and in no active rollout. 409 for the key already registered.
#[utoipa::path(post, path = "/api/v1/pending-agents/{id}/accept", tag = "agents",
    params(("id" = String, Path, description = "Agent id")), security(("bearer" = [])),
    request_body = AcceptBody,
    responses((status = 200, body = AgentView), (status = 202, body = ApprovedAgent),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn accept_agent(
    Admin(_): Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let body: AcceptBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("bad body: {e}")))?;
    let answer = {
        let mut hub = state.hub();
        match hub.approve_agent(&id, &body.key_id, unix_ms())? {
            Approval::Accepted(record) => Json(AgentView::new(*record, &hub)).into_response(),
            Approval::Ahead => {
                let ahead = ApprovedAgent {
                    id,
                    key_id: body.key_id.0.to_hex(),
                };
                (StatusCode::ACCEPTED, Json(ahead)).into_response()
            }
        }
    };
    state.store.flush().await?;
    Ok(answer)
}

/// Keys approved ahead and not used yet: for agents not registered, and replacement devices
/// of registered ones. Approving another key replaces one; `DELETE /api/v1/agents/{id}`
/// withdraws one with the agent.
#[utoipa::path(get, path = "/api/v1/approved-agents", tag = "agents", security(("bearer" = [])),
    responses((status = 200, body = Vec<ApprovedAgent>)))]
async fn list_approved_agents(
    Viewer(_): Viewer,
    State(state): State<AppState>,
) -> ApiResult<Json<Vec<ApprovedAgent>>> {
    let approvals = state
        .hub()
        .approvals()
        .iter()
        .map(|(id, key)| ApprovedAgent {
            id: id.clone(),
            key_id: key.0.to_hex(),
        })
        .collect();
    Ok(Json(approvals))
}

/// Counts of agents by presence, version and health, and the active rollouts.
#[utoipa::path(get, path = "/api/v1/fleet", tag = "agents", security(("bearer" = [])),
    responses((status = 200, body = FleetSummary)))]
async fn fleet_summary(
    Viewer(_): Viewer,
    State(state): State<AppState>,
) -> ApiResult<Json<FleetSummary>> {
    Ok(Json(FleetSummary::new(&state.hub())))
}

// ---- bundles ---------------------------------------------------------------------------

/// Bundles held, newest first.
#[utoipa::path(get, path = "/api/v1/bundles", tag = "bundles", security(("bearer" = [])),
    responses((status = 200, body = Vec<BundleRecord>)))]
async fn list_bundles(
    Viewer(_): Viewer,
    State(state): State<AppState>,
) -> ApiResult<Json<Vec<BundleRecord>>> {
    Ok(Json(state.hub().bundles()))
}

/// Uploads a signed bundle (the raw file as the body). It is verified against the server's
/// trusted publisher keys; 201 when new, 200 when already held.
#[utoipa::path(post, path = "/api/v1/bundles", tag = "bundles", security(("bearer" = [])),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = BundleRecord), (status = 200, body = BundleRecord),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)))]
async fn upload_bundle(
    Operator(caller): Operator,
    State(state): State<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<(StatusCode, Json<BundleRecord>)> {
    let bytes = body.map_err(|e| {
        ApiError::new(
            e.status(),
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                format!(
                    "bundle larger than the {} byte upload limit",
                    state.max_upload_bytes
                )
            } else {
                e.body_text()
            },
        )
    })?;
    if bytes.is_empty() {
        return Err(ApiError::bad_request("empty body: send the bundle file"));
    }
    let now = unix_ms();
    // Hashing a large payload takes a while; do it off the hub's lock and the executor.
    let verifier = state.hub().upload_verifier(now)?;
    let checked = {
        let bytes = bytes.clone();
        tokio::task::spawn_blocking(move || verifier.verify(&bytes))
            .await
            .map_err(|e| anyhow::anyhow!("verification task failed: {e}"))?
    }
    .map_err(|e| ApiError::bad_request(format!("bundle refused: {e}")))?;
    let (record, created) = state.hub().add_bundle(checked, &bytes, now)?;
    state.store.flush().await?;
    tracing::info!(caller = caller.name(), bundle = %record.digest, created, "bundle upload");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(record)))
}

/// One bundle, by digest or `name@version`.
#[utoipa::path(get, path = "/api/v1/bundles/{reference}", tag = "bundles",
    params(("reference" = String, Path, description = "Digest or name@version")), security(("bearer" = [])),
    responses((status = 200, body = BundleRecord), (status = 404, body = ErrorBody)))]
async fn get_bundle(
    Viewer(_): Viewer,
    State(state): State<AppState>,
    Path(reference): Path<String>,
) -> ApiResult<Json<BundleRecord>> {
    Ok(Json(state.hub().bundle(&reference)?))
}

// ---- trust -----------------------------------------------------------------------------

/// The publisher keys and control-plane key trusted now, every key set kept, and the
/// agents that report an older key set.
#[utoipa::path(get, path = "/api/v1/trust", tag = "trust", security(("bearer" = [])),
    responses((status = 200, body = TrustView)))]
async fn get_trust(Viewer(_): Viewer, State(state): State<AppState>) -> ApiResult<Json<TrustView>> {
    Ok(Json(TrustView::new(&state.hub())))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct KeySetQuery {
    /// Accept it even though agents serve, or active rollouts ship, bundles its keys did not
    /// sign.
    force: Option<bool>,
}

/// Adds the key set that follows the trusted one (the signed file as the body; admin). It must
/// be signed by a threshold of the trusted keys and a threshold of its own; agents are sent the
/// chain and follow it. 409 when it is not the next version, or when agents serve bundles its
/// keys did not sign (unless `force`).
#[utoipa::path(post, path = "/api/v1/trust", tag = "trust", params(KeySetQuery),
    request_body(content = Vec<u8>, content_type = "application/cbor"), security(("bearer" = [])),
    responses((status = 201, body = TrustView), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn add_key_set(
    Admin(caller): Admin,
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<KeySetQuery>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<TrustView>)> {
    let signed = SignedKeySet::decode(&body)
        .map_err(|e| ApiError::bad_request(format!("key set refused: {e}")))?;
    // Which held bundles the new keys signed is read from every bundle's header; do it off
    // the hub's lock and the executor, then let the hub check the set again and judge it.
    let candidates = {
        let hub = state.hub();
        let accepted = hub.check_key_set(&signed)?;
        hub.unlearned_signers(&accepted.keys)
    };
    let store = state.store.clone();
    let scan = tokio::task::spawn_blocking(move || SignerScan::run(&store, candidates))
        .await
        .map_err(|e| anyhow::anyhow!("signer scan failed: {e}"))??;
    let view = {
        let mut hub = state.hub();
        let accepted = hub.add_key_set(signed, scan, query.force == Some(true), unix_ms())?;
        tracing::info!(
            caller = caller.name(),
            key_set = accepted.keys.version(),
            "key set added"
        );
        TrustView::new(&hub)
    };
    state.store.flush().await?;
    Ok((StatusCode::CREATED, Json(view)))
}

// ---- rollouts --------------------------------------------------------------------------

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct RolloutQuery {
    /// Only rollouts that still hold their agents (pending, running, paused, rolling back).
    active: Option<bool>,
    /// At most this many, the newest; default all.
    limit: Option<usize>,
    /// Only those listed after this one: the last id of the previous page.
    before: Option<String>,
}

/// Rollouts, newest first; every one in full unless `active` or `limit` narrow them. Paged
/// with `limit` and `before`.
#[utoipa::path(get, path = "/api/v1/rollouts", tag = "rollouts", params(RolloutQuery),
    security(("bearer" = [])), responses((status = 200, body = Vec<RolloutView>),
        (status = 400, body = ErrorBody)))]
async fn list_rollouts(
    Viewer(_): Viewer,
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<RolloutQuery>,
) -> ApiResult<Json<Vec<RolloutView>>> {
    if query.limit == Some(0) {
        return Err(ApiError::bad_request("limit must be at least 1"));
    }
    let hub = state.hub();
    let mut rollouts = hub.rollouts().into_iter();
    if let Some(before) = &query.before {
        hub.rollout(before)?;
        rollouts.find(|r| r.id() == before);
    }
    Ok(Json(
        rollouts
            .filter(|r| query.active != Some(true) || r.is_active())
            .take(query.limit.unwrap_or(usize::MAX))
            .map(RolloutView::new)
            .collect(),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct CreateQuery {
    /// Rollout id; default `name-version-N`.
    id: Option<String>,
}

/// Starts a rollout from a spec (JSON): bundle, selector, waves, gates, on_failure,
/// install_timeout_secs, stratify_by.
#[utoipa::path(post, path = "/api/v1/rollouts", tag = "rollouts", params(CreateQuery),
    security(("bearer" = [])),
    request_body(content = Object, content_type = "application/json", description = "A rollout spec"),
    responses((status = 201, body = RolloutView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_rollout(
    Operator(caller): Operator,
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<CreateQuery>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<RolloutView>)> {
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::bad_request("spec is not UTF-8"))?;
    let spec = RolloutSpec::from_json(text)
        .map_err(|e| ApiError::bad_request(format!("invalid rollout spec: {e}")))?;
    let view = {
        let mut hub = state.hub();
        RolloutView::new(hub.create_rollout(query.id, spec, unix_ms())?)
    };
    state.store.flush().await?;
    tracing::info!(caller = caller.name(), rollout = view.id, "rollout created");
    Ok((StatusCode::CREATED, Json(view)))
}

/// One rollout with per-wave progress, gate values, and the new and previous versions'
/// metrics side by side.
#[utoipa::path(get, path = "/api/v1/rollouts/{id}", tag = "rollouts",
    params(("id" = String, Path, description = "Rollout id")), security(("bearer" = [])),
    responses((status = 200, body = RolloutView), (status = 404, body = ErrorBody)))]
async fn get_rollout(
    Viewer(_): Viewer,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<RolloutView>> {
    Ok(Json(RolloutView::new(state.hub().rollout(&id)?)))
}

/// Optional reason for a steering action.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SteerBody {
    /// Why, for the event log.
    reason: Option<String>,
}

/// Pauses, resumes, aborts (stop where it is) or rolls back (every updated agent returns to
/// its previous version) a rollout.
#[utoipa::path(post, path = "/api/v1/rollouts/{id}/{action}", tag = "rollouts",
    params(("id" = String, Path, description = "Rollout id"),
        ("action" = String, Path, description = "pause, resume, abort or rollback")),
    security(("bearer" = [])), request_body(content = Option<SteerBody>),
    responses((status = 200, body = RolloutView), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn steer_rollout(
    Operator(caller): Operator,
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<RolloutView>> {
    let steer = match action.as_str() {
        "pause" => Steer::Pause,
        "resume" => Steer::Resume,
        "abort" => Steer::Abort,
        "rollback" => Steer::Rollback,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("unknown rollout action {other:?}: use pause, resume, abort or rollback"),
            ))
        }
    };
    let body: SteerBody = if body.is_empty() {
        SteerBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("bad body: {e}")))?
    };
    let reason = body
        .reason
        .map(|r| format!("{r} (by {})", caller.name()))
        .or_else(|| Some(format!("operator request (by {})", caller.name())));
    let view = {
        let mut hub = state.hub();
        RolloutView::new(hub.steer(&id, steer, reason, unix_ms())?)
    };
    state.store.flush().await?;
    Ok(Json(view))
}

// ---- events ----------------------------------------------------------------------------

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct EventQuery {
    /// Only events about this agent.
    agent: Option<String>,
    /// Only events of this rollout.
    rollout: Option<String>,
    /// Only events of this kind.
    kind: Option<String>,
    /// Only events with a larger id (paging: pass the previous page's `next_after`).
    after: Option<u64>,
    /// Page size, 1-1000; default 100.
    limit: Option<usize>,
    /// Newest first (the latest `limit` events), instead of oldest first from `after`.
    newest: Option<bool>,
}

/// The event log, oldest first and paged by `after`, or the latest `limit` events newest
/// first with `newest=true`.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventQuery),
    security(("bearer" = [])), responses((status = 200, body = EventsPage)))]
async fn list_events(
    Viewer(_): Viewer,
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<EventQuery>,
) -> ApiResult<Json<EventsPage>> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1-1000"));
    }
    let filter = EventFilter {
        agent: query.agent,
        rollout: query.rollout,
        kind: query.kind,
    };
    if query.newest == Some(true) {
        let events = filter.read(&state.store, LogEnd::Newest, limit).await?;
        return Ok(Json(EventsPage {
            events,
            next_after: None,
        }));
    }
    let after = LogEnd::After(query.after.unwrap_or(0));
    let events = filter.read(&state.store, after, limit).await?;
    let next_after = events.last().map(|e| e.id).or(query.after);
    Ok(Json(EventsPage { events, next_after }))
}

/// Which events a reader of the log wants: those about `agent`, of `rollout` and of `kind`,
/// each when given.
#[derive(Debug, Clone)]
struct EventFilter {
    agent: Option<String>,
    rollout: Option<String>,
    kind: Option<String>,
}

/// Where a read of the event log starts.
#[derive(Debug, Clone, Copy)]
enum LogEnd {
    /// Oldest first, after this id.
    After(u64),
    /// Newest first.
    Newest,
}

impl EventFilter {
    fn matches(&self, e: &EventRecord) -> bool {
        self.agent
            .as_ref()
            .is_none_or(|a| e.agent.as_ref() == Some(a))
            && self
                .rollout
                .as_ref()
                .is_none_or(|r| e.rollout.as_ref() == Some(r))
            && self.kind.as_ref().is_none_or(|k| &e.kind == k)
    }

    /// Up to `limit` matching events from `from`, read on a blocking thread: a filter for a
    /// rare kind may scan the whole log.
    async fn read(
        &self,
        store: &Store,
        from: LogEnd,
        limit: usize,
    ) -> anyhow::Result<Vec<EventRecord>> {
        let (store, filter) = (store.clone(), self.clone());
        tokio::task::spawn_blocking(move || match from {
            LogEnd::After(after) => store.events(after, limit, |e| filter.matches(e)),
            LogEnd::Newest => store.latest_events(limit, |e| filter.matches(e)),
        })
        .await
        .map_err(|e| anyhow::anyhow!("the event log reader failed: {e}"))?
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct StreamQuery {
    /// Only events about this agent.
    agent: Option<String>,
    /// Only events of this rollout.
    rollout: Option<String>,
    /// Only events of this kind.
    kind: Option<String>,
    /// Start after this event id (default: from now on); a `Last-Event-ID` header wins.
    after: Option<u64>,
}

/// How many events the stream reads from the log at a time.
const STREAM_BATCH: usize = 100;

/// The event log as it grows, as server-sent events: each has the event's id, its kind as the
/// SSE event name, and the record as JSON data. Starts after `after` (or the `Last-Event-ID` a
/// reconnecting client sends), else with the next event; comments keep idle connections open.
#[utoipa::path(get, path = "/api/v1/events/stream", tag = "events", params(StreamQuery),
    security(("bearer" = [])),
    responses((status = 200, content_type = "text/event-stream", description = "events as they are logged")))]
async fn stream_events(
    Viewer(_): Viewer,
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<StreamQuery>,
    headers: axum::http::HeaderMap,
) -> ApiResult<
    axum::response::Sse<
        impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
> {
    let resume = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::bad_request("Last-Event-ID must be an event id"))?,
        ),
    };
    let mut appended = state.store.watch_events();
    let after = resume
        .or(query.after)
        .unwrap_or_else(|| *appended.borrow_and_update());
    let reader = EventReader {
        store: state.store.clone(),
        filter: EventFilter {
            agent: query.agent,
            rollout: query.rollout,
            kind: query.kind,
        },
        after,
        appended,
        shutdown: state.shutdown.clone(),
    };
    use futures_util::StreamExt as _;
    let stream = futures_util::stream::unfold(reader, EventReader::next_batch)
        .map(futures_util::stream::iter)
        .flatten();
    Ok(axum::response::Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default()))
}

/// Where one event stream is in the log.
struct EventReader {
    store: Store,
    filter: EventFilter,
    after: u64,
    appended: tokio::sync::watch::Receiver<u64>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl EventReader {
    /// The next events that match, as SSE events, waiting for them if there are none yet;
    /// `None` ends the stream (the server is stopping, or the log cannot be read).
    async fn next_batch(
        mut self,
    ) -> Option<(
        Vec<Result<axum::response::sse::Event, std::convert::Infallible>>,
        Self,
    )> {
        loop {
            // Taken before the read: an event appended after it marks the watch changed, so
            // it is read on the next turn rather than skipped.
            let newest = *self.appended.borrow_and_update();
            let read = self
                .filter
                .read(&self.store, LogEnd::After(self.after), STREAM_BATCH);
            let batch = match read.await {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot read the event log for a stream");
                    return None;
                }
            };
            if let Some(last) = batch.last() {
                self.after = last.id;
                let events = batch.iter().map(|e| Ok(sse_event(e))).collect();
                return Some((events, self));
            }
            // Nothing up to `newest` matches: go on from there once another is appended.
            self.after = self.after.max(newest);
            tokio::select! {
                changed = self.appended.changed() => changed.ok()?,
                _ = self.shutdown.changed() => return None,
            }
        }
    }
}

fn sse_event(e: &EventRecord) -> axum::response::sse::Event {
    axum::response::sse::Event::default()
        .id(e.id.to_string())
        .event(&e.kind)
        .data(serde_json::to_string(e).expect("invariant: event records encode as JSON"))
}

// ---- server ----------------------------------------------------------------------------

/// Who a token belongs to, and what it may upload.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct WhoAmI {
    /// The token's name in the server's config.
    pub name: String,
    /// Its role.
    pub role: super::config::Role,
    /// The largest bundle upload the server accepts, in bytes.
    pub max_upload_bytes: u64,
}

/// The caller's token name and role and the upload limit: a refused upload is answered
/// before its body is read, so a client checks these before a long upload instead.
#[utoipa::path(get, path = "/api/v1/whoami", tag = "server", security(("bearer" = [])),
    responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody)))]
async fn whoami(caller: Caller, State(state): State<AppState>) -> Json<WhoAmI> {
    Json(WhoAmI {
        name: caller.name().to_owned(),
        role: caller.role(),
        max_upload_bytes: u64::try_from(state.max_upload_bytes).unwrap_or(u64::MAX),
    })
}

/// A backup of the server's whole state (admin), streamed: agents, bundles and their bytes,
/// desired states, rollouts and the event log, as one file that `flotilla server restore`
/// takes. The records are read at one moment under the hub's lock; keys are not included.
#[utoipa::path(get, path = "/api/v1/backup", tag = "server", security(("bearer" = [])),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
        (status = 403, body = ErrorBody)))]
async fn backup(Admin(_): Admin, State(state): State<AppState>) -> ApiResult<Response> {
    // Reading every record is blocking I/O: off the async workers, under the hub's lock.
    let (hub, store) = (state.hub.clone(), state.store.clone());
    let snapshot = tokio::task::spawn_blocking(move || {
        let _writes = hub.lock().expect("invariant: hub lock never poisoned");
        store.snapshot()
    })
    .await
    .map_err(|e| anyhow::anyhow!("the backup snapshot failed: {e}"))??;
    let created_ms = unix_ms();
    let store = state.store.clone();
    // The file is written on a blocking thread into a small channel, so a slow reader holds
    // at most a few pieces of it in memory.
    let (pieces, received) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let out = std::io::BufWriter::with_capacity(BACKUP_PIECE, ChannelWriter(pieces.clone()));
        if let Err(error) = super::backup::write(&store, snapshot, created_ms, out) {
            // Most often the client went away; either way the client sees the stream fail.
            tracing::warn!(error = %format!("{error:#}"), "backup not completed");
            let _ = pieces.blocking_send(Err(std::io::Error::other(format!("{error:#}"))));
        }
    });
    let stream = futures_util::stream::unfold(received, |mut received| async move {
        received.recv().await.map(|piece| (piece, received))
    });
    let name = format!("attachment; filename=\"flotilla-{created_ms}.backup\"");
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_DISPOSITION, name),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// Bytes per piece of a streamed backup.
const BACKUP_PIECE: usize = 256 * 1024;

/// Hands what is written to an async receiver, at most [`BACKUP_PIECE`] bytes at a time (a
/// bundle's bytes arrive in one write); fails once the receiver is gone.
struct ChannelWriter(tokio::sync::mpsc::Sender<std::io::Result<Bytes>>);

impl std::io::Write for ChannelWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let piece = &bytes[..bytes.len().min(BACKUP_PIECE)];
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(piece)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))?;
        Ok(piece.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The control plane's public key (PEM): agents need it to check desired states. After a key
/// set moved it, the newest one (for agents configured with the newest key set).
#[utoipa::path(get, path = "/api/v1/server/key", tag = "server", security(("bearer" = [])),
    responses((status = 200, content_type = "application/x-pem-file", body = String)))]
async fn server_key(Viewer(_): Viewer, State(state): State<AppState>) -> ApiResult<Response> {
    let pem = state
        .hub()
        .control_plane_key()
        .to_pem()
        .map_err(anyhow::Error::from)?;
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response())
}
