//! The agent service: follows the signed desired state, installs bundles, serves the active
//! model on the local API, and reports presence and telemetry to the control plane.
//!
//! One task owns the decisions (the loop in [`run`]); installs run in their own task so the
//! loop keeps answering heartbeats and chunk traffic while a model downloads and loads.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use flotilla_shared::wire::{
    topics, Birth, Chunk, ChunkRequest, DesiredBundle, DesiredState, Envelope, Event, EventKind,
    Health, Heartbeat, Presence, SignedDesiredState, Telemetry,
};
use flotilla_shared::Sha256Digest;
use flotilla_shared::{KeyId, SignedKeySet};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, info_span, warn, Instrument};

use crate::config::AgentConfig;
use crate::download::{self, DownloadConfig, Requester};
use crate::host::{capabilities, ProcessSampler};
use crate::identity::Identity;
use crate::install::{InstallError, Installer, Stage, Staged, Trust};
use crate::keyfile;
use crate::link::{Incoming, Link, LinkConfig, LinkHandle, QoS};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::serving::{ModelSlot, ServedModel};
use crate::store::Store;

/// Unix milliseconds now.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Loads the trust configuration's key files.
pub fn load_trust(config: &AgentConfig) -> Result<Trust> {
    let publishers = config
        .trust
        .publishers
        .iter()
        .map(|p| keyfile::load_public(p))
        .collect::<Result<Vec<_>>>()?;
    let control_plane = config
        .trust
        .control_plane
        .as_deref()
        .map(keyfile::load_public)
        .transpose()?;
    Ok(Trust {
        publishers,
        threshold: config.trust.threshold,
        control_plane,
        key_set: config.trust.key_set,
        key_set_digest: None,
    })
}

/// Everything the agent's tasks share.
struct Shared {
    config: AgentConfig,
    installer: Installer,
    slot: Arc<ModelSlot>,
    metrics: Arc<Metrics>,
    outbox: Outbox,
    link: LinkHandle,
    started: Instant,
    /// The served model's degradation, each cause reported once in an event.
    degradation: DegradationWatch,
    /// The control-plane key the configuration names, under which generations count until a
    /// key set moves to another.
    configured_control_plane: Option<KeyId>,
    /// Why the chain of key sets last stopped short, so a chain that every desired state
    /// carries again is reported once.
    trust_refusal: std::sync::Mutex<Option<String>>,
}

impl Shared {
    fn event(&self, rollout: Option<&str>, digest: Option<Sha256Digest>, kind: EventKind) {
        let event = Event {
            session: self.link.session(),
            rollout: rollout.map(str::to_owned),
            digest,
            kind,
        };
        if let Err(e) = self.outbox.push(Telemetry::Event(event)) {
            warn!(error = %e, "cannot queue event");
        }
    }
}

/// Routes chunk requests over the MQTT link.
struct LinkRequester(LinkHandle);

impl Requester for LinkRequester {
    fn request(&self, digest: &Sha256Digest, request: ChunkRequest) -> Result<(), String> {
        let body = Envelope::new(self.0.agent_id(), 0, now_ms(), request).encode();
        self.0
            .publish(
                topics::bundle_requests(digest),
                body,
                QoS::AtMostOnce,
                false,
            )
            .map_err(|e| e.to_string())
    }
}

/// An install in progress.
struct Install {
    digest: Sha256Digest,
    chunks: mpsc::Sender<Chunk>,
    task: AbortOnDrop<()>,
}

/// A spawned task that ends with whoever owns it, so an agent whose `run` future is dropped
/// (as in a crash) leaves nothing running behind: no install, no delivery, no listener.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    /// Aborts the task and waits until it is gone, with everything it held released.
    async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the agent until `shutdown` completes, then drains requests, flushes state, publishes
/// the offline presence and returns.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    config.validate()?;
    let trust = load_trust(&config)?;
    let configured_control_plane = trust.control_plane.map(|k| k.id());
    let store = Store::open(&config.data_dir)?;
    let identity = Identity::load_or_create(&config.data_dir)?;
    let installer = Installer::new(store.clone(), trust, config.inference.backends.clone())
        .with_placement(config.inference.placement());
    // Before the model is restored: its bundle is checked against the keys trusted now.
    installer.restore_key_sets()?;
    let slot = Arc::new(ModelSlot::new(config.inference.max_concurrency));
    let metrics = Arc::new(Metrics::new());

    // Restore before anything is announced, so the birth says what is really served.
    let restore_installer = installer.clone();
    let restored = tokio::task::spawn_blocking(move || restore_installer.restore()).await??;
    if let Some(restored) = &restored {
        metrics.model_loaded(&restored.staged.served);
        metrics.set_self_test(restored.staged.served.digest, true);
        slot.activate(restored.staged.served.clone());
        info!(model = %restored.staged.served.manifest.id(), fell_back = restored.fell_back, "restored model");
    }

    let api = ApiServer::start(&config.api, slot.clone(), metrics.clone()).await?;

    let backends = installer.placement().available_backends();
    let link = start_link(&config, &identity, &installer, &slot, backends)?;
    let (mut incoming, link) = link;
    let outbox = Outbox::open(
        store.tree("outbox")?,
        &config.id,
        identity.clone(),
        config.outbox_capacity,
    )?;
    let delivery = AbortOnDrop(outbox.spawn_delivery(link.clone()));

    let shared = Arc::new(Shared {
        config,
        installer,
        slot,
        metrics,
        outbox,
        link,
        started: Instant::now(),
        degradation: DegradationWatch::default(),
        trust_refusal: std::sync::Mutex::default(),
        configured_control_plane,
    });
    shared.event(
        None,
        None,
        EventKind::Started {
            active: shared.slot.current().map(|m| m.active()),
        },
    );

    let mut heartbeat = tokio::time::interval(shared.config.heartbeat());
    let mut sampler = ProcessSampler::new();
    let mut install: Option<Install> = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = heartbeat.tick() => send_heartbeat(&shared, &mut sampler),
            message = incoming.recv() => {
                let Some(message) = message else { break };
                handle_incoming(&shared, &mut install, message);
            }
        }
        if install.as_ref().is_some_and(|i| i.task.is_finished()) {
            install = None;
        }
    }

    info!("shutting down");
    if let Some(install) = install.take() {
        install.task.stop().await;
    }
    api.stop().await;
    let drained = shared.slot.drain(Duration::from_secs(10)).await;
    if !drained {
        warn!("requests still running after 10 s; stopping anyway");
    }
    shared.installer.store().flush()?;
    let offline = Envelope::new(
        &shared.config.id,
        0,
        now_ms(),
        Presence::Offline {
            session: shared.link.session(),
        },
    );
    let offline = identity.seal(&topics::agent_state(&shared.config.id), offline.encode());
    if let Err(e) = shared.link.shutdown(offline).await {
        warn!(error = %e, "offline presence not confirmed");
    }
    // Only once the delivery task is gone is the store closed: a caller may open it again
    // as soon as this returns.
    delivery.stop().await;
    Ok(())
}

fn start_link(
    config: &AgentConfig,
    identity: &Identity,
    installer: &Installer,
    slot: &Arc<ModelSlot>,
    backends: Vec<flotilla_shared::manifest::Backend>,
) -> Result<(mpsc::Receiver<Incoming>, LinkHandle)> {
    let id = config.id.clone();
    let labels = config.labels.clone();
    let birth_slot = slot.clone();
    let birth_id = id.clone();
    let birth_installer = installer.clone();
    let birth_identity = identity.clone();
    let state_topic = topics::agent_state(&id);
    let birth_topic = state_topic.clone();
    let birth = Arc::new(move |session: u64| {
        let trust = birth_installer.trust();
        let birth = Birth {
            session,
            labels: labels.clone(),
            capabilities: capabilities(backends.clone()),
            active: birth_slot.current().map(|m| m.active()),
            key_set: trust.key_set,
            key_set_digest: trust.key_set_digest,
            identity: birth_identity.public(),
        };
        let envelope = Envelope::new(&birth_id, 0, now_ms(), Presence::Online(birth));
        birth_identity.seal(&birth_topic, envelope.encode())
    });
    let will_id = id.clone();
    let will_identity = identity.clone();
    let will = Arc::new(move |session: u64| {
        let envelope = Envelope::new(&will_id, 0, now_ms(), Presence::Offline { session });
        will_identity.seal(&state_topic, envelope.encode())
    });

    let mut link_config = LinkConfig::new(id.clone(), config.broker.clone(), birth, will);
    link_config.subscriptions = vec![topics::agent_desired(&id)];
    link_config.own_key = Some(identity.public());
    let (handle, incoming) = Link::start(link_config, installer.store().tree("session")?)?;
    Ok((incoming, handle))
}

/// Reports a new degradation of the served model as a `degraded` event (once per cause) and,
/// while degraded, tries the better backend again in the background once it is due.
fn check_degradation(shared: &Shared) -> Option<String> {
    let model = shared.slot.current()?;
    let after = shared.config.inference.retry_after();
    let (cause, new) = shared.degradation.check(&model, after);
    if let (Some(cause), true) = (&cause, new) {
        shared.event(
            None,
            Some(model.digest),
            EventKind::Degraded {
                cause: cause.clone(),
            },
        );
    }
    cause
}

/// Follows a served model's degradation: each new cause is logged once, and while the model is
/// degraded its better engine is tried again in the background once due.
#[derive(Debug, Default)]
pub struct DegradationWatch {
    /// The cause last seen, so each is reported once.
    reported: std::sync::Mutex<Option<String>>,
}

impl DegradationWatch {
    /// Looks at `model` now: returns why it is degraded, if it is, and whether that cause is
    /// new since the last check. When degraded, starts a retry of each better engine whose
    /// failure is at least `retry_after` old (the ladder runs one retry at a time).
    pub fn check(&self, model: &Arc<ServedModel>, retry_after: Duration) -> (Option<String>, bool) {
        let cause = model.model.degradation();
        let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        let new = cause.is_some() && *reported != cause;
        if let (Some(cause), true) = (&cause, new) {
            warn!(model = %model.manifest.id(), %cause, "serving degraded");
        }
        reported.clone_from(&cause);
        drop(reported);

        if cause.is_some() {
            let model = model.clone();
            let span = info_span!("engine_retry", model = %model.manifest.id());
            // Loading an engine is slow and blocking.
            tokio::task::spawn_blocking(move || {
                let _span = span.entered();
                model.model.engines().retry(retry_after)
            });
        }
        (cause, new)
    }
}

fn send_heartbeat(shared: &Shared, sampler: &mut ProcessSampler) {
    let degradation = check_degradation(shared);
    let active = shared.slot.current().map(|m| m.active());
    let health = match (&active, degradation) {
        (None, _) => Health::NoModel,
        (Some(_), Some(cause)) => Health::Degraded { cause },
        (Some(_), None) => Health::Ok,
    };
    let trust = shared.installer.trust();
    let heartbeat = Heartbeat {
        session: shared.link.session(),
        uptime_s: shared.started.elapsed().as_secs(),
        active,
        health,
        host: sampler.sample(),
        models: shared.metrics.version_snapshots(),
        dropped_telemetry: shared.outbox.dropped(),
        key_set: trust.key_set,
        key_set_digest: trust.key_set_digest,
    };
    if let Err(e) = shared.outbox.push(Telemetry::Heartbeat(heartbeat)) {
        warn!(error = %e, "cannot queue heartbeat");
    }
}

fn handle_incoming(shared: &Arc<Shared>, install: &mut Option<Install>, message: Incoming) {
    if message.topic == topics::agent_desired(&shared.config.id) {
        handle_desired(shared, install, &message.payload);
        return;
    }
    let Some(current) = install.as_ref() else {
        return;
    };
    if message.topic != topics::bundle_chunks(&current.digest) {
        return;
    }
    match Envelope::<Chunk>::decode(&message.payload) {
        // A full queue means the downloader is busy writing: drop, the chunk is asked again.
        Ok(envelope) => drop(current.chunks.try_send(envelope.body)),
        Err(e) => warn!(error = %e, "malformed chunk message"),
    }
}

/// Follows the chain of key sets a desired state carries: each set that follows the trusted
/// one is applied and reported; a chain that stops short is reported once per reason. Runs
/// before the state's bundle is looked at, so the keys it needs are trusted by then.
fn follow_key_sets(shared: &Shared, chain: &[SignedKeySet]) {
    if chain.is_empty() {
        return;
    }
    let followed = match shared.installer.follow_key_sets(chain) {
        Ok(followed) => followed,
        Err(e) => return refuse_trust(shared, format!("{e:#}")),
    };
    let active = shared.slot.current();
    // Against the keys trusted now, after the whole chain: one header read however many sets.
    let active_trusted = followed.accepted.is_empty()
        || active
            .as_ref()
            .is_none_or(|m| shared.installer.kept_is_trusted(&m.digest));
    for accepted in &followed.accepted {
        if !active_trusted {
            warn!(
                key_set = accepted.keys.version(),
                "the bundle being served is not signed by the new keys: it keeps serving, but a restart will not load it"
            );
        }
        let kind = EventKind::KeySetApplied {
            version: accepted.keys.version(),
            digest: Some(accepted.signed.digest()),
            publishers: accepted.keys.publishers().iter().map(|k| k.id()).collect(),
            threshold: u32::try_from(accepted.keys.threshold()).unwrap_or(u32::MAX),
            control_plane: accepted.set.control_plane.map(|k| k.id()),
            reset_floors: accepted.set.reset_floors.keys().cloned().collect(),
            active_trusted,
        };
        shared.event(None, active.as_ref().map(|m| m.digest), kind);
    }
    match followed.refused {
        Some(e) => refuse_trust(shared, e.to_string()),
        None => {
            *shared
                .trust_refusal
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = None
        }
    }
}

fn refuse_trust(shared: &Shared, reason: String) {
    let mut last = shared
        .trust_refusal
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if last.as_deref() == Some(reason.as_str()) {
        return;
    }
    warn!(%reason, "key set not applied");
    *last = Some(reason.clone());
    drop(last);
    shared.event(None, None, EventKind::KeySetRejected { reason });
}

/// A desired state signed by the control plane's key and addressed to this agent.
fn open_desired(shared: &Shared, payload: &[u8]) -> Result<DesiredState, String> {
    let envelope = Envelope::<SignedDesiredState>::decode(payload).map_err(|e| e.to_string())?;
    let trust = shared.installer.trust();
    let key = trust
        .control_plane
        .as_ref()
        .ok_or("no control-plane key is configured")?;
    let state = envelope.body.open(key).map_err(|e| e.to_string())?;
    if state.agent != shared.config.id {
        return Err(format!("desired state is addressed to {:?}", state.agent));
    }
    Ok(state)
}

/// The state, unless an older or the same generation was applied already.
fn fresh_desired(shared: &Shared, state: DesiredState) -> Result<Option<DesiredState>, String> {
    let applied = shared
        .installer
        .store()
        .desired_generation(generation_scope(shared).as_ref())
        .map_err(|e| e.to_string())?;
    if state.generation < applied {
        return Err(format!(
            "stale desired state: generation {} is older than {applied}",
            state.generation
        ));
    }
    if state.generation == applied && applied != 0 {
        return Ok(None); // re-delivered after a reconnect; already applied
    }
    Ok(Some(state))
}

fn handle_desired(shared: &Arc<Shared>, install: &mut Option<Install>, payload: &[u8]) {
    if payload.is_empty() {
        // The broker's retained state was cleared: the control plane forgot this id.
        info!("the control plane withdrew this agent's desired state");
        return;
    }
    let state = open_desired(shared, payload).and_then(|state| {
        // Before the generation check: a state sent again carries a longer chain.
        follow_key_sets(shared, &state.key_sets);
        fresh_desired(shared, state)
    });
    let state = match state {
        Ok(Some(state)) => state,
        Ok(None) => return,
        Err(reason) => {
            warn!(%reason, "desired state ignored");
            shared.event(None, None, EventKind::DesiredStateRejected { reason });
            return;
        }
    };
    let Some(bundle) = state.bundle.clone() else {
        record_generation(shared, state.generation);
        return;
    };

    if shared
        .slot
        .current()
        .is_some_and(|m| m.digest == bundle.digest)
    {
        record_generation(shared, state.generation);
        let kind = EventKind::Active {
            name: bundle.name.clone(),
            version: bundle.version.clone(),
        };
        shared.event(state.rollout.as_deref(), Some(bundle.digest), kind);
        return;
    }
    if let Some(current) = install.as_ref() {
        if current.digest == bundle.digest {
            return; // already on its way
        }
    }
    if let Some(previous) = install.take() {
        // A newer desired state supersedes the install in progress; its files stay resumable.
        drop(previous.task);
        shared
            .link
            .unsubscribe(&topics::bundle_chunks(&previous.digest));
    }

    let (chunks_tx, chunks_rx) = mpsc::channel(64);
    let span = info_span!("install", agent = %shared.config.id, digest = %bundle.digest.short());
    let task = AbortOnDrop(tokio::spawn(
        install_task(shared.clone(), state, bundle.clone(), chunks_rx).instrument(span),
    ));
    *install = Some(Install {
        digest: bundle.digest,
        chunks: chunks_tx,
        task,
    });
}

/// The control-plane key generations count under: `None` while the configured one is
/// trusted, else the key a key set moved to.
fn generation_scope(shared: &Shared) -> Option<KeyId> {
    let trusted = shared.installer.trust().control_plane.map(|k| k.id());
    trusted.filter(|id| Some(*id) != shared.configured_control_plane)
}

fn record_generation(shared: &Shared, generation: u64) {
    let scope = generation_scope(shared);
    if let Err(e) = shared
        .installer
        .store()
        .set_desired_generation(scope.as_ref(), generation)
    {
        warn!(error = %e, "cannot record desired-state generation");
    }
}

async fn install_task(
    shared: Arc<Shared>,
    state: DesiredState,
    bundle: DesiredBundle,
    chunks: mpsc::Receiver<Chunk>,
) {
    let rollout = state.rollout.clone();
    let result = install(&shared, &state, &bundle, chunks).await;
    shared
        .link
        .unsubscribe(&topics::bundle_chunks(&bundle.digest));
    match result {
        Ok(()) => record_generation(&shared, state.generation),
        Err(e) => {
            warn!(stage = %e.stage, reason = %e.reason, "install failed; current model keeps serving");
            if e.stage == Stage::SelfTest {
                shared.metrics.set_self_test(bundle.digest, false);
                let kind = EventKind::SelfTestFailed {
                    reason: e.reason.clone(),
                };
                shared.event(rollout.as_deref(), Some(bundle.digest), kind);
            }
            let kind = EventKind::InstallFailed {
                stage: e.stage.to_string(),
                reason: e.reason,
            };
            shared.event(rollout.as_deref(), Some(bundle.digest), kind);
            // A definitive failure: do not retry this generation on every reconnect.
            record_generation(&shared, state.generation);
        }
    }
}

async fn install(
    shared: &Arc<Shared>,
    state: &DesiredState,
    bundle: &DesiredBundle,
    mut chunks: mpsc::Receiver<Chunk>,
) -> Result<(), InstallError> {
    let rollout = state.rollout.as_deref();
    let digest = bundle.digest;
    let installer = shared.installer.clone();

    let (bytes, verified) = if installer.has_bundle(&digest) {
        // Kept from an earlier install: a rollback or a retry needs no download.
        let bytes = blocking(move || installer.read_kept(&digest)).await?;
        shared.event(rollout, Some(digest), EventKind::Verifying);
        let (installer, data) = (shared.installer.clone(), bytes.clone());
        let verified = blocking(move || installer.verify_kept(&data)).await?;
        (bytes, verified)
    } else {
        shared
            .link
            .subscribe(topics::bundle_chunks(&digest))
            .map_err(|e| InstallError::at(Stage::Download, e))?;
        let progress_shared = shared.clone();
        let progress_rollout = state.rollout.clone();
        let last = std::sync::Mutex::new(u32::MAX);
        let progress: download::ProgressFn = Arc::new(move |held, total| {
            // About ten progress events per download, plus the first and the last.
            let step = (total / 10).max(1);
            let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
            if *last == u32::MAX || held == total || held / step != *last / step {
                *last = held;
                let kind = EventKind::Downloading {
                    received: held,
                    total,
                };
                progress_shared.event(progress_rollout.as_deref(), Some(digest), kind);
            }
        });
        let requester = LinkRequester(shared.link.clone());
        let config = DownloadConfig::default();
        let bytes = download::download(
            digest,
            &shared.config.id,
            &shared.installer,
            &requester,
            &mut chunks,
            &config,
            progress,
        )
        .await?;

        shared.event(rollout, Some(digest), EventKind::Verifying);
        let (installer, data) = (shared.installer.clone(), bytes.clone());
        let verified = blocking(move || {
            let verified = installer.verify_new(&data)?;
            installer.keep(&verified, &data)?;
            download::discard(&installer, &digest);
            Ok(verified)
        })
        .await?;
        (bytes, verified)
    };

    let installer = shared.installer.clone();
    let prepared = blocking(move || installer.prepare(&verified, &bytes)).await?;
    shared.event(rollout, Some(digest), EventKind::Staged);
    let staged: Staged = blocking(move || Installer::self_test(prepared)).await?;
    shared.event(rollout, Some(digest), EventKind::SelfTestPassed);
    shared.metrics.set_self_test(digest, true);
    shared.metrics.model_loaded(&staged.served);

    shared.installer.activate(&staged, &shared.slot)?;
    let m = &staged.served.manifest;
    let kind = EventKind::Active {
        name: m.name.clone(),
        version: m.version.to_string(),
    };
    shared.event(rollout, Some(digest), kind);
    check_degradation(shared);
    Ok(())
}

/// Runs blocking install work off the executor.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, InstallError> + Send + 'static,
) -> Result<T, InstallError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| InstallError::at(Stage::Stage, format!("install task failed: {e}")))?
}

/// The local HTTP API, running until [`ApiServer::stop`].
pub struct ApiServer {
    /// Address it listens on.
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: Option<AbortOnDrop<std::io::Result<()>>>,
}

impl ApiServer {
    /// Binds `config.listen` and serves the API on it.
    pub async fn start(
        config: &crate::config::ApiConfig,
        slot: Arc<ModelSlot>,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let state = crate::api::ApiState::new(slot, metrics, config.clone());
        let app = crate::api::router(state);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = AbortOnDrop(tokio::spawn(
            async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
            }
            .instrument(info_span!("api", %addr)),
        ));
        info!(%addr, "local api listening");
        Ok(Self {
            addr,
            stop,
            task: Some(task),
        })
    }

    /// Stops accepting connections and waits for requests in flight to finish.
    pub async fn stop(mut self) {
        let _ = self.stop.send(());
        let Some(mut task) = self.task.take() else {
            return;
        };
        match (&mut task.0).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "local api ended with an error"),
            Err(e) => warn!(error = %e, "local api task failed"),
        }
    }
}
