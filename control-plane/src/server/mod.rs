//! `flotilla server`: the fleet hub.
//!
//! One process holds the fleet registry, every bundle, the rollouts and the event log (in
//! sled under the data directory), embeds an MQTT broker unless told to use an external one,
//! and serves the REST API. Its parts:
//!
//! - [`config`]: the TOML config and its defaults.
//! - [`store`]: the sled trees.
//! - [`registry`]: per-agent records and the presence and sequence rules.
//! - [`hub`]: the state behind one lock and every rule that changes it, including driving
//!   the rollout engine and signing desired states.
//! - [`mqtt`]: the MQTT client tasks (input, publishing, chunk distribution).
//! - [`broker`]: the embedded rumqttd.
//! - [`api`]: axum routes, auth and the OpenAPI document; [`metrics`]: Prometheus;
//!   [`tls`]: HTTPS for them.

pub mod api;
pub mod backup;
pub mod broker;
pub mod config;
pub mod hub;
pub mod metrics;
pub mod mqtt;
pub mod registry;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum_server::tls_rustls::RustlsConfig;
use flotilla_shared::{PublicKey, SecretKey};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::keyfile;
use config::{hash_token, ApiTls, Role, ServerConfig, TokenConfig};
use hub::{Hub, HubSettings};

/// How often rollout timers and agent timeouts are checked.
const TICK: Duration = Duration::from_millis(250);
/// How often the event log is trimmed to `max_events`, and how many events go at most each
/// time: a log that grew past the limit (a lowered limit, a restored backup) shrinks at
/// 1000 events a second.
const TRIM_EVERY: Duration = Duration::from_secs(10);
const TRIM_BATCH: usize = 10_000;

/// File names under the data directory.
pub const KEY_NAME: &str = "control-plane";
/// The admin token generated when the config names none.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A started server; [`RunningServer::stop`] ends it (the embedded broker's threads stay:
/// rumqttd cannot be stopped, which matters only to tests that start several servers).
pub struct RunningServer {
    /// Where the REST API listens.
    pub api_addr: SocketAddr,
    /// Its base URL: `https://` with `api_tls`, else `http://`.
    pub api_url: String,
    /// Where the embedded broker listens, when there is one.
    pub mqtt_addr: Option<SocketAddr>,
    /// The key agents on the newest key set must trust for desired states, as of the start
    /// (`control-plane.pub` until a key set names another).
    pub public_key: PublicKey,
    /// The generated admin token, when the config named no token.
    pub admin_token: Option<String>,
    /// The HTTPS files and the live config they were read into, with `api_tls`.
    tls: Option<(ApiTls, RustlsConfig)>,
    hub: Arc<Mutex<Hub>>,
    store: store::Store,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("api_addr", &self.api_addr)
            .field("mqtt_addr", &self.mqtt_addr)
            .finish_non_exhaustive()
    }
}

impl RunningServer {
    /// The hub, for tests and embedding.
    pub fn hub(&self) -> Arc<Mutex<Hub>> {
        self.hub.clone()
    }

    /// Reads the `api_tls` files again and serves new connections with them; connections
    /// already open keep the certificate they began with. Files that do not load leave the
    /// current certificate in place, and the error says why.
    pub fn reload_tls(&self) -> Result<()> {
        let Some((files, live)) = &self.tls else {
            bail!("the API serves plain HTTP (no api_tls): there is no certificate to reload");
        };
        live.reload_from_config(tls::server_config(files)?);
        tracing::info!(cert = %files.cert_file.display(), "API certificate reloaded");
        Ok(())
    }

    /// Stops the API, the clock and the MQTT client, and flushes the database.
    pub async fn stop(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        self.store.flush().await
    }
}

/// Starts a server from `config`; returns once the API listens and the MQTT client runs.
pub async fn start(config: ServerConfig) -> Result<RunningServer> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let key = server_key(&config.data_dir)?;
    let (tokens, admin_token) = api_tokens(&config)?;
    let publishers = config.publisher_keys()?;
    if publishers.is_empty() {
        tracing::warn!("no trusted publisher keys configured: every bundle upload will be refused");
    }
    // Read before anything starts, so a bad file stops the server with nothing running.
    let tls = match &config.api_tls {
        Some(files) => Some((
            files.clone(),
            RustlsConfig::from_config(tls::server_config(files)?),
        )),
        None => None,
    };

    let store = store::Store::open(&config.data_dir)?;
    let mqtt_addr = if config.mqtt.external.is_none() {
        broker::start(&config.mqtt)?;
        tracing::info!(address = %config.mqtt.listen, "embedded MQTT broker listening");
        Some(config.mqtt.listen)
    } else {
        None
    };

    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let hub = Hub::load(
        store.clone(),
        HubSettings {
            key,
            publishers,
            threshold: config.trust.threshold,
            key_set: config.trust.key_set,
            key_dir: config.data_dir.clone(),
            agent_timeout_ms: config.agent_timeout().as_millis() as u64,
            assign_new_agents: config.assign_new_agents,
            admission: config.admission,
        },
        out_tx,
        unix_ms(),
    )?;
    let public_key = hub.control_plane_key();
    let hub = Arc::new(Mutex::new(hub));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let stats = Arc::new(mqtt::MqttStats::default());
    let mut tasks = mqtt::spawn(
        mqtt::client_options(&config.mqtt)?,
        hub.clone(),
        store.clone(),
        out_rx,
        stats.clone(),
        config.bundle_hold(),
        shutdown_rx.clone(),
    );
    tasks.push(tokio::spawn(run_clock(hub.clone(), shutdown_rx.clone())));
    if config.max_events > 0 {
        tasks.push(tokio::spawn(run_event_trim(
            store.clone(),
            config.max_events,
            shutdown_rx.clone(),
        )));
    }

    let state = api::AppState {
        hub: hub.clone(),
        store: store.clone(),
        tokens: Arc::new(tokens),
        metrics: Arc::new(metrics::ServerMetrics::new()),
        mqtt: stats,
        max_upload_bytes: usize::try_from(config.max_upload_bytes).unwrap_or(usize::MAX),
        shutdown: shutdown_rx.clone(),
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen for the API on {}", config.listen))?;
    let api_addr = listener.local_addr()?;
    tasks.push(match &tls {
        Some((_, live)) => serve_https(listener, live.clone(), api::router(state), shutdown_rx)?,
        None => serve_http(listener, api::router(state), shutdown_rx),
    });
    let scheme = if tls.is_some() { "https" } else { "http" };
    let api_url = format!("{scheme}://{api_addr}");
    tracing::info!(url = %api_url, "control plane API listening");

    Ok(RunningServer {
        api_addr,
        api_url,
        mqtt_addr,
        public_key,
        admin_token,
        tls,
        hub,
        store,
        shutdown,
        tasks,
    })
}

fn serve_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "API server failed");
        }
    })
}

fn serve_https(
    listener: tokio::net::TcpListener,
    tls: RustlsConfig,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<()>> {
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(listener.into_std()?, tls)?.handle(handle.clone());
    Ok(tokio::spawn(async move {
        // As axum::serve does: stop accepting, then let open requests finish.
        tokio::spawn(async move {
            let _ = shutdown.changed().await;
            handle.graceful_shutdown(None);
        });
        if let Err(e) = server.serve(router.into_make_service()).await {
            tracing::error!(error = %e, "API server failed");
        }
    }))
}

/// Runs `step` every `period` (a late one is delayed, not bunched) until the server stops.
async fn every<F: std::future::Future<Output = ()>>(
    period: Duration,
    mut shutdown: watch::Receiver<bool>,
    mut step: impl FnMut() -> F,
) {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => break,
        }
        step().await;
    }
}

/// Steps presence timeouts and rollouts every [`TICK`].
async fn run_clock(hub: Arc<Mutex<Hub>>, shutdown: watch::Receiver<bool>) {
    every(TICK, shutdown, || {
        let result = hub
            .lock()
            .expect("invariant: hub lock never poisoned")
            .tick(unix_ms());
        if let Err(e) = result {
            tracing::error!(error = %format!("{e:#}"), "rollout clock step failed");
        }
        std::future::ready(())
    })
    .await;
}

/// Keeps the event log to its newest `max_events`, removing at most [`TRIM_BATCH`] every
/// [`TRIM_EVERY`] on a blocking thread (the hub's lock is not needed: ids only grow).
async fn run_event_trim(store: store::Store, max_events: u64, shutdown: watch::Receiver<bool>) {
    every(TRIM_EVERY, shutdown, || {
        let store = store.clone();
        async move {
            match tokio::task::spawn_blocking(move || store.prune_events(max_events, TRIM_BATCH))
                .await
            {
                Ok(Ok(0)) => {}
                Ok(Ok(removed)) => tracing::debug!(removed, "oldest events removed"),
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot trim the event log")
                }
                Err(e) => tracing::error!(error = %e, "event log trimming failed"),
            }
        }
    })
    .await;
}

/// Where the server's signing key lives in `data_dir`.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(format!("{KEY_NAME}.key"))
}

/// Where a control-plane key that a key set moves to lives: `DATA_DIR/control-plane-ID.key`,
/// named by the start of its key id.
pub fn next_key_path(data_dir: &Path, id: &flotilla_shared::KeyId) -> PathBuf {
    data_dir.join(format!("{KEY_NAME}-{id}.key"))
}

/// Makes a control-plane key for a key set to move to (`flotilla server new-key`): written
/// beside the first one as `control-plane-ID.key` (0600) and `.pub`. The server signs with it
/// only once a key set naming it is pushed, and then only for agents that trust that set.
pub fn new_key(data_dir: &Path) -> Result<keyfile::KeyPair> {
    let key = SecretKey::from_seed(keyfile::random_seed()?);
    let name = format!("{KEY_NAME}-{}", key.public().id());
    keyfile::write_pair(&name, data_dir, &key)
}

/// The server's signing key: `DATA_DIR/control-plane.key`, made (0600, with the `.pub`
/// beside it) on first start.
fn server_key(data_dir: &Path) -> Result<SecretKey> {
    let (key, made) = keyfile::load_or_generate(KEY_NAME, data_dir)?;
    if let Some(pair) = made {
        tracing::info!(
            public = %pair.public.display(),
            key_id = pair.id,
            "generated the control plane key; configure agents with the public key"
        );
    }
    Ok(key)
}

/// The configured tokens, or, when there are none, an admin token kept in
/// `DATA_DIR/admin.token` (0600), made on first start.
fn api_tokens(config: &ServerConfig) -> Result<(api::Tokens, Option<String>)> {
    if !config.tokens.is_empty() {
        return Ok((api::Tokens::new(&config.tokens), None));
    }
    let path = config.data_dir.join(ADMIN_TOKEN_FILE);
    if !path.exists() {
        let token = hex::encode(keyfile::random_seed()?);
        keyfile::write_new(&path, format!("{token}\n").as_bytes(), 0o600)?;
    }
    let token = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .trim()
        .to_owned();
    tracing::info!(
        file = %path.display(),
        "no API tokens configured; using the admin token in this file"
    );
    let tokens = api::Tokens::new(&[TokenConfig {
        name: "admin".into(),
        role: Role::Admin,
        sha256: hash_token(&token),
    }]);
    Ok((tokens, Some(token)))
}
