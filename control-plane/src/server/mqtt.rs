//! The server's MQTT client: agent reports in, desired states and chunks out.
//!
//! The event loop runs in its own task and never waits on anything but the broker: agent
//! messages are handled under the hub's lock (short, no IO but sled), chunk requests go to
//! the distribution task over an unbounded channel, and everything the server publishes
//! goes through [`AsyncClient`] from other tasks. That keeps clear of rumqttc's classic
//! deadlock, an event loop blocked on a channel that only its own polling would drain.
//!
//! The loop also keeps the retained [`ControlPlaneState`]: `online` after every (re)subscription,
//! `offline` as the Last Will and on a clean stop, so agents send telemetry only while someone
//! is subscribed to receive it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use flotilla_agent::link::{Backoff, BackoffConfig};
use flotilla_shared::wire::{topics, ChunkRequest, ControlPlaneState, Envelope, TOPIC_ROOT};
use flotilla_shared::Sha256Digest;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};

use super::config::{MqttConfig, MAX_PACKET_BYTES};
use super::hub::{Hub, Outgoing, SERVER_ID};
use super::store::Store;
use super::unix_ms;
use crate::distribution::{ChunkServer, DEFAULT_SHARE_WINDOW};

/// Requests the client may queue before publishing waits.
const CLIENT_QUEUE: usize = 1024;
/// How long a stopping server waits for the broker to confirm its `offline` state.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long it keeps handling agent messages after that: what agents sent before they heard
/// `offline` is at most a broker round trip behind.
const LEAVE_DRAIN: Duration = Duration::from_millis(250);

/// Counters the metrics endpoint reads.
#[derive(Debug, Default)]
pub struct MqttStats {
    /// Whether the client is connected and subscribed now.
    pub connected: AtomicBool,
    /// Connections made since start.
    pub connections: AtomicU64,
    /// Chunk payload bytes published.
    pub chunk_bytes: AtomicU64,
    /// Chunk requests answered.
    pub chunk_requests: AtomicU64,
    /// Chunk requests dropped as malformed.
    pub malformed_requests: AtomicU64,
    /// Bundles held in memory for downloads now.
    pub held_bundles: AtomicU64,
    /// Their bytes.
    pub held_bytes: AtomicU64,
}

/// Client options: the external broker's, or loopback to the embedded one.
pub fn client_options(mqtt: &MqttConfig) -> Result<MqttOptions> {
    let mut options = match &mqtt.external {
        Some(broker) => {
            flotilla_agent::link::mqtt_options(&mqtt.client_id, broker, MAX_PACKET_BYTES)?
        }
        None => {
            let mut options = MqttOptions::new(
                mqtt.client_id.clone(),
                mqtt.listen.ip().to_string(),
                mqtt.listen.port(),
            );
            options.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
            options
        }
    };
    options.set_keep_alive(Duration::from_secs(10));
    options.set_clean_session(true);
    options.set_inflight(200);
    Ok(options)
}

/// Starts the client tasks; they run until `shutdown` turns true. Bundles are held in memory
/// for downloads until nobody has asked for them for `bundle_hold`.
pub fn spawn(
    options: MqttOptions,
    hub: Arc<Mutex<Hub>>,
    store: Store,
    outgoing: mpsc::UnboundedReceiver<Outgoing>,
    stats: Arc<MqttStats>,
    bundle_hold: Duration,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let (client, eventloop) = AsyncClient::new(options, CLIENT_QUEUE);
    let (requests_tx, requests_rx) = mpsc::unbounded_channel();
    vec![
        tokio::spawn(run_eventloop(
            eventloop,
            client.clone(),
            hub,
            requests_tx,
            stats.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(run_publisher(client.clone(), outgoing, shutdown.clone())),
        tokio::spawn(run_distribution(
            client,
            store,
            requests_rx,
            stats,
            bundle_hold,
            shutdown,
        )),
    ]
}

async fn run_eventloop(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    hub: Arc<Mutex<Hub>>,
    requests: mpsc::UnboundedSender<(Sha256Digest, Vec<u8>)>,
    stats: Arc<MqttStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let presence = Presence::new(unix_ms());
    eventloop.mqtt_options.set_last_will(LastWill::new(
        topics::control_plane_state(),
        presence.encode(false),
        QoS::AtLeastOnce,
        true,
    ));
    let mut handler = Handler {
        client,
        hub,
        requests,
        stats,
        presence,
    };
    let mut backoff = Backoff::new(BackoffConfig {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(5),
        stable_after: Duration::from_secs(10),
    });
    let mut connected_at: Option<Instant> = None;
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            _ = shutdown.changed() => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected_at = Some(Instant::now());
                handler.on_connected();
            }
            Ok(Event::Incoming(packet)) => {
                handler.on_packet(packet);
            }
            Ok(_) => {}
            Err(e) => {
                handler.stats.connected.store(false, Ordering::SeqCst);
                if let Some(at) = connected_at.take() {
                    backoff.connection_ended(at.elapsed());
                    tracing::warn!(error = %e, "lost the MQTT broker; reconnecting");
                } else {
                    tracing::debug!(error = %e, "MQTT connection attempt failed");
                }
                let delay = backoff.next_delay(&mut rand::thread_rng());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => break,
                }
            }
        }
    }
    if connected_at.is_some() {
        handler.leave(&mut eventloop).await;
    }
}

/// The control plane's retained presence, [`ControlPlaneState`], for this process.
struct Presence {
    epoch: u64,
    /// Whether our `online` came back on this connection. What arrives before it is the
    /// retained state it replaces.
    echoed: bool,
    /// Whether the server is stopping and has said `offline`.
    leaving: bool,
    /// Whether the broker has forwarded that `offline` back to us (and so to every agent).
    offline_seen: bool,
}

impl Presence {
    fn new(epoch: u64) -> Self {
        Self {
            epoch,
            echoed: false,
            leaving: false,
            offline_seen: false,
        }
    }

    fn encode(&self, online: bool) -> Vec<u8> {
        let state = ControlPlaneState {
            online,
            epoch: self.epoch,
        };
        Envelope::new(SERVER_ID, self.epoch, unix_ms(), state).encode()
    }
}

/// What the event loop does with the broker's packets.
struct Handler {
    client: AsyncClient,
    hub: Arc<Mutex<Hub>>,
    requests: mpsc::UnboundedSender<(Sha256Digest, Vec<u8>)>,
    stats: Arc<MqttStats>,
    presence: Presence,
}

impl Handler {
    fn on_connected(&mut self) {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        tracing::info!("connected to the MQTT broker");
        self.presence.echoed = false;
        // try_*: awaiting here would wait on the queue this loop drains. A broker handles one
        // connection's packets in order, so by the time agents see `online` the
        // subscriptions are in place and no telemetry they send from then on is missed.
        for filter in [
            topics::all_agents("state"),
            topics::all_agents("telemetry"),
            format!("{TOPIC_ROOT}/bundles/+/requests"),
            topics::control_plane_state(),
        ] {
            if let Err(e) = self.client.try_subscribe(filter, QoS::AtLeastOnce) {
                tracing::error!(error = %e, "cannot queue a subscription");
            }
        }
        self.announce(true);
        self.hub
            .lock()
            .expect("invariant: hub lock never poisoned")
            .republish_desired();
    }

    fn announce(&self, online: bool) {
        if let Err(e) = self.client.try_publish(
            topics::control_plane_state(),
            QoS::AtLeastOnce,
            true,
            self.presence.encode(online),
        ) {
            tracing::error!(error = %e, online, "cannot queue the control-plane state");
        }
    }

    fn on_packet(&mut self, packet: Packet) {
        match packet {
            Packet::SubAck(_) => {
                // Ready once the broker confirmed the subscriptions: from here on no agent
                // message is missed.
                self.stats.connected.store(true, Ordering::SeqCst);
            }
            Packet::Publish(publish) if publish.topic == topics::control_plane_state() => {
                self.on_own_state(&publish.payload);
            }
            Packet::Publish(publish) => {
                let topic = publish.topic.as_str();
                if let Some(digest) = request_topic_digest(topic) {
                    let _ = self.requests.send((digest, publish.payload.to_vec()));
                } else {
                    self.hub
                        .lock()
                        .expect("invariant: hub lock never poisoned")
                        .on_agent_message(topic, &publish.payload, unix_ms());
                }
            }
            _ => {}
        }
    }

    /// Watches the retained state: an `offline` while we are up would tell agents nobody
    /// listens, so we say `online` again; an `online` of another epoch is a second control
    /// plane on the same broker, which is worth a warning.
    fn on_own_state(&mut self, payload: &[u8]) {
        let Ok(envelope) = Envelope::<ControlPlaneState>::decode(payload) else {
            tracing::warn!("undecodable message on the control-plane state topic");
            return;
        };
        let state = envelope.body;
        let own = self.presence.epoch;
        if self.presence.leaving {
            self.presence.offline_seen |= !state.online && state.epoch == own;
        } else if !self.presence.echoed {
            self.presence.echoed = state.online && state.epoch == own;
        } else if state.online {
            if state.epoch != own {
                tracing::warn!(
                    epoch = state.epoch,
                    own,
                    "another control plane announced itself on this broker"
                );
            }
        } else {
            // The retained state now says offline (a late will of an earlier connection or
            // process): agents connecting from here on would hold their telemetry for good.
            tracing::info!(
                epoch = state.epoch,
                "broker shows the control plane offline, announcing it again"
            );
            self.announce(true);
        }
    }

    /// A clean exit: tell agents to hold their telemetry, keep handling what they sent before
    /// they heard it, then disconnect.
    async fn leave(&mut self, eventloop: &mut rumqttc::EventLoop) {
        self.presence.leaving = true;
        self.announce(false);
        let deadline = tokio::time::Instant::now() + LEAVE_TIMEOUT;
        let mut drain_until = None;
        loop {
            let until = drain_until.unwrap_or(deadline).min(deadline);
            let event = match tokio::time::timeout_at(until, eventloop.poll()).await {
                Ok(Ok(event)) => event,
                Ok(Err(_)) | Err(_) => break,
            };
            if let Event::Incoming(packet) = event {
                self.on_packet(packet);
            }
            if self.presence.offline_seen && drain_until.is_none() {
                drain_until = Some(tokio::time::Instant::now() + LEAVE_DRAIN);
            }
        }
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(LEAVE_DRAIN, async {
            while let Ok(event) = eventloop.poll().await {
                if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
}

fn request_topic_digest(topic: &str) -> Option<Sha256Digest> {
    topic
        .strip_prefix(TOPIC_ROOT)?
        .strip_prefix("/bundles/")?
        .strip_suffix("/requests")?
        .parse()
        .ok()
}

async fn run_publisher(
    client: AsyncClient,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let message = tokio::select! {
            message = outgoing.recv() => message,
            _ = shutdown.changed() => break,
        };
        let Some(message) = message else { break };
        if let Err(e) = client
            .publish(
                message.topic,
                QoS::AtLeastOnce,
                message.retain,
                message.payload,
            )
            .await
        {
            tracing::error!(error = %e, "cannot queue a publish");
        }
    }
}

/// Bounds on how often the distribution task looks for bundles to let go.
const SWEEP_MIN: Duration = Duration::from_millis(100);
const SWEEP_MAX: Duration = Duration::from_secs(30);

fn publish_held(chunks: &ChunkServer, stats: &MqttStats) {
    let (bundles, bytes) = chunks.held();
    stats.held_bundles.store(bundles as u64, Ordering::Relaxed);
    stats.held_bytes.store(bytes, Ordering::Relaxed);
}

/// Answers chunk requests from the store's bundles, loading each into memory on first ask
/// and letting it go once nobody has asked for it for `hold`.
async fn run_distribution(
    client: AsyncClient,
    store: Store,
    mut requests: mpsc::UnboundedReceiver<(Sha256Digest, Vec<u8>)>,
    stats: Arc<MqttStats>,
    hold: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut chunks = ChunkServer::new(DEFAULT_SHARE_WINDOW);
    let mut seq = unix_ms();
    // Looked at a few times per hold, so a bundle outlives its hold by a fraction of it.
    let mut sweep = tokio::time::interval((hold / 4).clamp(SWEEP_MIN, SWEEP_MAX));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let request = tokio::select! {
            request = requests.recv() => request,
            _ = sweep.tick() => {
                let released = chunks.release_idle(Instant::now(), hold);
                if released > 0 {
                    tracing::debug!(released, "bundles no longer downloaded left memory");
                }
                publish_held(&chunks, &stats);
                continue;
            }
            _ = shutdown.changed() => break,
        };
        let Some((digest, payload)) = request else {
            break;
        };
        let request = match Envelope::<ChunkRequest>::decode(&payload) {
            Ok(env) if env.from == env.body.agent => env.body,
            Ok(_) | Err(_) => {
                stats.malformed_requests.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        if !chunks.holds(&digest) {
            match store.bundle_bytes(&digest) {
                Ok(Some(bytes)) => {
                    if let Err(e) = chunks.insert(bytes, Instant::now()) {
                        tracing::error!(%digest, error = %e, "a stored bundle does not parse");
                    }
                    publish_held(&chunks, &stats);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(%digest, error = %format!("{e:#}"), "cannot read a bundle")
                }
            }
        }
        stats.chunk_requests.fetch_add(1, Ordering::Relaxed);
        let before = chunks.bytes_published;
        let answers = chunks.answer(&digest, &request, Instant::now());
        stats
            .chunk_bytes
            .fetch_add(chunks.bytes_published - before, Ordering::Relaxed);
        for chunk in answers {
            seq += 1;
            let body = Envelope::new(SERVER_ID, seq, unix_ms(), chunk).encode();
            if let Err(e) = client
                .publish(topics::bundle_chunks(&digest), QoS::AtMostOnce, false, body)
                .await
            {
                tracing::error!(error = %e, "cannot queue a chunk");
            }
        }
    }
}
