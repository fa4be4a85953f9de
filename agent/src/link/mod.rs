//! The agent's MQTT connection: one link to the broker that reconnects by itself.
//!
//! [`Link::start`] spawns a task that owns the rumqttc event loop and hands back a
//! [`LinkHandle`] and a receiver of [`Incoming`] messages. Nothing a caller does can stall the
//! event loop: publishes go through a bounded queue that answers [`LinkError::QueueFull`]
//! instead of waiting, and the loop itself never awaits a full channel.
//!
//! Every connection attempt takes a fresh session number from the session store (persisted and
//! flushed first), and the attempt's Last Will carries that same number: the retained
//! `agents/{id}/state` topic always shows either the birth or the will of one session, and a
//! will older than the latest birth is recognisably stale. On every ConnAck the link
//! subscribes again to everything it should be subscribed to and then publishes the birth, so
//! nothing sent in answer to the birth is missed. The link also follows the control plane's
//! retained state and reports through [`LinkHandle::control_plane_listening`] whether anyone
//! is subscribed to the agent's telemetry on the current connection.
//!
//! Incoming messages go to a bounded channel. When the consumer falls behind, bundle chunk
//! messages (`bundles/{digest}/chunks`) are dropped, since downloaders re-request what they
//! miss; other messages wait in an overflow queue of [`INCOMING_OVERFLOW`] messages, and only
//! past that is the oldest dropped. Every drop is counted in [`LinkStats::dropped_incoming`].

mod backoff;
mod options;
mod task;

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use flotilla_shared::wire::{check_agent_id, topics};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

pub use backoff::{Backoff, BackoffConfig};
pub use options::mqtt_options;
/// MQTT quality of service, re-exported so callers need not depend on rumqttc.
pub use rumqttc::QoS;

use crate::config::BrokerConfig;

/// Messages that wait for a slow consumer before the oldest is dropped (chunks never wait).
pub const INCOMING_OVERFLOW: usize = 1024;

/// Builds an encoded presence envelope for a session number: the birth or the will.
pub type PresenceFn = Arc<dyn Fn(u64) -> Vec<u8> + Send + Sync>;

/// A message the broker delivered on one of the link's subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// Topic it was published on.
    pub topic: String,
    /// The payload as published.
    pub payload: Bytes,
}

/// Why a link operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The outgoing queue is full; the message was not queued.
    #[error("outgoing mqtt queue is full")]
    QueueFull,
    /// The link has shut down or was abandoned.
    #[error("mqtt link is closed")]
    Closed,
    /// A topic to publish on contains wildcards.
    #[error("cannot publish on topic {0:?}: wildcards are not allowed")]
    InvalidTopic(String),
    /// A subscription filter is malformed.
    #[error("invalid subscription filter {0:?}")]
    InvalidFilter(String),
    /// A message would exceed the maximum packet size.
    #[error("message on {topic} is {size} bytes, over the {max} byte packet limit")]
    TooLarge {
        /// Topic of the message.
        topic: String,
        /// Packet size it would need.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// The connection the message went out on ended before the broker acknowledged it.
    #[error("connection ended before the broker acknowledged the message")]
    Unacknowledged,
    /// Shutdown found no connection to publish the offline presence on.
    #[error("not connected: offline presence not published")]
    NotConnected,
    /// Shutdown could not confirm the offline presence in time.
    #[error("offline presence not confirmed by the broker within {0:?}")]
    ShutdownTimedOut(Duration),
    /// The agent id cannot be used as an MQTT client id and topic level.
    #[error("invalid agent id: {0}")]
    AgentId(String),
    /// The broker URL cannot be used.
    #[error("invalid broker url {url:?}: {reason}")]
    BrokerUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Keep-alive does not fit MQTT's 16-bit field.
    #[error("broker keep_alive_secs {0} exceeds 65535")]
    KeepAlive(u64),
    /// A password was configured without a user name.
    #[error("broker password is set but username is not")]
    PasswordWithoutUser,
    /// `mqtts://` without a CA file.
    #[error("broker url is mqtts:// but ca_file is not set")]
    MissingCaFile,
    /// Only one of client certificate and key was configured.
    #[error("broker client_cert and client_key go together")]
    ClientCertWithoutKey,
    /// A PEM file could not be read.
    #[error("cannot read broker {what} {path}: {source}")]
    ReadPem {
        /// Which setting named the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The IO or PEM error.
        source: std::io::Error,
    },
    /// A PEM file holds no certificate or key.
    #[error("broker {what} {path} holds no usable PEM item")]
    NoPemItem {
        /// Which setting named the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the certificates or key.
    #[error("tls setup with {path} failed: {source}")]
    Tls {
        /// The file involved.
        path: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
    /// [`Link::start`] was called outside a tokio runtime.
    #[error("mqtt link must be started inside a tokio runtime")]
    NoRuntime,
    /// The session counter could not be read or stored.
    #[error("session counter store failed: {0}")]
    SessionStore(#[from] sled::Error),
}

/// Everything a link needs. Build with [`LinkConfig::new`] and adjust fields.
#[derive(Clone)]
pub struct LinkConfig {
    /// Agent id: client id and topic level.
    pub agent_id: String,
    /// Broker address, TLS and credentials.
    pub broker: BrokerConfig,
    /// Encoded `Envelope<Presence::Online>` for a session, built at every connect so it carries
    /// what the agent serves at that moment.
    pub birth: PresenceFn,
    /// Encoded `Envelope<Presence::Offline>` for a session: the Last Will.
    pub will: PresenceFn,
    /// Filters to subscribe to from the first connection on. Default: none.
    pub subscriptions: Vec<String>,
    /// Largest MQTT packet either way, in bytes. Default 1 MiB (128 KiB chunks fit easily).
    pub max_packet_bytes: usize,
    /// Publishes that may wait for the connection before [`LinkError::QueueFull`]. Default 256.
    pub queue_capacity: usize,
    /// Incoming messages buffered for the consumer. Default 256.
    pub incoming_capacity: usize,
    /// Reconnect schedule. Default: 250 ms doubling to 30 s, full jitter.
    pub backoff: BackoffConfig,
    /// How long [`LinkHandle::shutdown`] waits for the broker. Default 5 s.
    pub shutdown_timeout: Duration,
    /// The agent's own public key: presence on its state topic that this key did not sign
    /// is ignored. Default: none (anything that decodes counts).
    pub own_key: Option<flotilla_shared::PublicKey>,
}

impl fmt::Debug for LinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkConfig")
            .field("agent_id", &self.agent_id)
            .field("broker_url", &self.broker.url)
            .field("subscriptions", &self.subscriptions)
            .field("max_packet_bytes", &self.max_packet_bytes)
            .field("queue_capacity", &self.queue_capacity)
            .field("incoming_capacity", &self.incoming_capacity)
            .field("backoff", &self.backoff)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish_non_exhaustive()
    }
}

impl LinkConfig {
    /// A config with the documented defaults.
    pub fn new(
        agent_id: impl Into<String>,
        broker: BrokerConfig,
        birth: PresenceFn,
        will: PresenceFn,
    ) -> Self {
        Self {
            agent_id: agent_id.into(),
            broker,
            birth,
            will,
            subscriptions: Vec::new(),
            max_packet_bytes: 1024 * 1024,
            queue_capacity: 256,
            incoming_capacity: 256,
            backoff: BackoffConfig::default(),
            shutdown_timeout: Duration::from_secs(5),
            own_key: None,
        }
    }
}

/// Counters of one link, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Incoming messages dropped because the consumer was too slow.
    pub dropped_incoming: u64,
    /// Connections established (ConnAcks received).
    pub connections: u64,
}

/// Starts links; see the module docs.
#[derive(Debug)]
pub struct Link;

impl Link {
    /// Checks the config, spawns the link task on the current tokio runtime and returns its
    /// handle with the receiver of incoming messages. The first connection attempt starts at
    /// once. `session_tree` holds the session counter under `b"session"`.
    pub fn start(
        config: LinkConfig,
        session_tree: sled::Tree,
    ) -> Result<(LinkHandle, mpsc::Receiver<Incoming>), LinkError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| LinkError::NoRuntime)?;
        check_agent_id(&config.agent_id).map_err(LinkError::AgentId)?;
        for filter in &config.subscriptions {
            check_filter(filter)?;
        }
        let options =
            options::mqtt_options(&config.agent_id, &config.broker, config.max_packet_bytes)?;

        let (commands_tx, commands_rx) = mpsc::channel(config.queue_capacity.max(1));
        let (incoming_tx, incoming_rx) = mpsc::channel(config.incoming_capacity.max(1));
        let (subscriptions_tx, subscriptions_rx) = watch::channel(
            config
                .subscriptions
                .iter()
                .cloned()
                .collect::<BTreeSet<_>>(),
        );
        let (connected_tx, connected_rx) = watch::channel(false);
        let (listening_tx, listening_rx) = watch::channel(false);
        let (stats_tx, stats_rx) = watch::channel(LinkStats::default());
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let session = Arc::new(AtomicU64::new(0));
        let state_topic = topics::agent_state(&config.agent_id);

        let task = task::Task {
            agent_id: config.agent_id.clone(),
            state_topic: state_topic.clone(),
            options,
            birth: config.birth,
            will: config.will,
            keep_alive: Duration::from_secs(config.broker.keep_alive_secs),
            shutdown_timeout: config.shutdown_timeout,
            own_key: config.own_key,
            session_tree,
            session: session.clone(),
            commands: commands_rx,
            subscriptions: subscriptions_rx,
            shutdown: shutdown_rx,
            shutdown_seen: false,
            connected: connected_tx,
            control_plane_topic: topics::control_plane_state(),
            control_plane: None,
            listening: listening_tx,
            stats: stats_tx,
            incoming: incoming_tx,
            overflow: Default::default(),
            backoff: Backoff::new(config.backoff),
            failed_attempts: 0,
        };
        let span = tracing::info_span!("mqtt_link", agent = %config.agent_id);
        let join = runtime.spawn(task.run().instrument(span));

        let shared = Arc::new(Shared {
            agent_id: config.agent_id,
            state_topic,
            max_packet_bytes: config.max_packet_bytes,
            shutdown_timeout: config.shutdown_timeout,
            subscriptions: subscriptions_tx,
            connected: connected_rx,
            listening: listening_rx,
            stats: stats_rx,
            session,
            shutdown: Mutex::new(Some(shutdown_tx)),
            join: Mutex::new(Some(join)),
        });
        Ok((
            LinkHandle {
                commands: commands_tx,
                shared,
            },
            incoming_rx,
        ))
    }
}

/// What every handle of one link shares. The task holds none of it, so when the last handle
/// goes the task sees its channels close.
struct Shared {
    agent_id: String,
    state_topic: String,
    max_packet_bytes: usize,
    shutdown_timeout: Duration,
    subscriptions: watch::Sender<BTreeSet<String>>,
    connected: watch::Receiver<bool>,
    listening: watch::Receiver<bool>,
    stats: watch::Receiver<LinkStats>,
    session: Arc<AtomicU64>,
    shutdown: Mutex<Option<oneshot::Sender<task::ShutdownRequest>>>,
    join: Mutex<Option<JoinHandle<()>>>,
}

/// A cheap, cloneable handle on a running link.
///
/// Dropping every handle ends the link the way a crash would, without DISCONNECT, so the
/// broker publishes the will; [`LinkHandle::shutdown`] is the clean way out.
#[derive(Clone)]
pub struct LinkHandle {
    commands: mpsc::Sender<task::Command>,
    shared: Arc<Shared>,
}

impl fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkHandle")
            .field("agent_id", &self.shared.agent_id)
            .field("session", &self.session())
            .field("connected", &*self.shared.connected.borrow())
            .finish()
    }
}

impl LinkHandle {
    /// The agent id the link connects as.
    pub fn agent_id(&self) -> &str {
        &self.shared.agent_id
    }

    /// Session number of the current (or latest) connection attempt; 0 before the first.
    pub fn session(&self) -> u64 {
        self.shared.session.load(Ordering::Acquire)
    }

    /// Whether the link is connected now; changes as it connects and drops. The sender goes
    /// away when the link task ends, which a watcher sees as `changed()` failing.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.shared.connected.clone()
    }

    /// Whether the control plane is listening: connected, and its retained state said
    /// `online` on this connection. Telemetry waits for this; see
    /// [`flotilla_shared::wire::ControlPlaneState`].
    pub fn control_plane_listening(&self) -> watch::Receiver<bool> {
        self.shared.listening.clone()
    }

    /// The link's counters, updated as they change.
    pub fn stats(&self) -> watch::Receiver<LinkStats> {
        self.shared.stats.clone()
    }

    /// Queues a message without waiting. Queued messages go out once connected, in order;
    /// one that was handed to a connection which then drops is lost with it, so anything that
    /// must arrive belongs in the outbox (see [`LinkHandle::publish_confirmed`]).
    pub fn publish(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Vec<u8>>,
        qos: QoS,
        retain: bool,
    ) -> Result<(), LinkError> {
        let command = self.publish_command(topic.into(), payload.into(), qos, retain, None)?;
        self.commands
            .try_send(command)
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => LinkError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => LinkError::Closed,
            })
    }

    /// Queues a QoS 1 message, waiting for queue space (never for the broker), and returns an
    /// [`Ack`] that completes when the broker acknowledges it, or fails when the connection
    /// it went out on ends first.
    pub async fn publish_confirmed(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Result<Ack, LinkError> {
        let (ack_tx, ack_rx) = oneshot::channel();
        let command = self.publish_command(
            topic.into(),
            payload.into(),
            QoS::AtLeastOnce,
            false,
            Some(ack_tx),
        )?;
        self.commands
            .send(command)
            .await
            .map_err(|_| LinkError::Closed)?;
        Ok(Ack(ack_rx))
    }

    fn publish_command(
        &self,
        topic: String,
        payload: Vec<u8>,
        qos: QoS,
        retain: bool,
        ack: Option<oneshot::Sender<()>>,
    ) -> Result<task::Command, LinkError> {
        if topic.is_empty() || !rumqttc::valid_topic(&topic) {
            return Err(LinkError::InvalidTopic(topic));
        }
        // Fixed header (at most 5 bytes), topic length prefix, packet id.
        let size = 5 + 2 + topic.len() + 2 + payload.len();
        if size > self.shared.max_packet_bytes {
            return Err(LinkError::TooLarge {
                topic,
                size,
                max: self.shared.max_packet_bytes,
            });
        }
        Ok(task::Command::Publish {
            topic,
            payload,
            qos,
            retain,
            ack,
        })
    }

    /// Adds a filter to the link's subscriptions; it applies now if connected and again after
    /// every reconnect. Never blocks and never fails for a full queue.
    pub fn subscribe(&self, filter: impl Into<String>) -> Result<(), LinkError> {
        let filter = filter.into();
        check_filter(&filter)?;
        if filter == self.shared.state_topic {
            // The link watches its own state topic itself; see `task::Task::on_own_presence`.
            return Ok(());
        }
        self.shared
            .subscriptions
            .send_if_modified(|set| set.insert(filter));
        Ok(())
    }

    /// Removes a filter from the link's subscriptions, now and for later reconnects.
    pub fn unsubscribe(&self, filter: &str) {
        self.shared
            .subscriptions
            .send_if_modified(|set| set.remove(filter));
    }

    /// The filters the link keeps subscribed.
    pub fn subscriptions(&self) -> Vec<String> {
        self.shared.subscriptions.borrow().iter().cloned().collect()
    }

    /// Publishes `offline` (retained, QoS 1) on the agent's state topic, waits for the broker
    /// to acknowledge it, disconnects cleanly (so no will follows) and waits for the link task
    /// to end; all within the configured shutdown timeout, after which the connection is
    /// dropped. Publishes still queued are discarded. Only the first call does anything.
    pub async fn shutdown(&self, offline: Vec<u8>) -> Result<(), LinkError> {
        let sender = self
            .shared
            .shutdown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let join = self
            .shared
            .join
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (Some(sender), Some(join)) = (sender, join) else {
            return Err(LinkError::Closed);
        };

        let (done_tx, done_rx) = oneshot::channel();
        let _ = sender.send(task::ShutdownRequest {
            offline,
            done: done_tx,
        });
        // The task enforces the timeout itself; this margin only covers a task that hangs.
        let margin = self.shared.shutdown_timeout + Duration::from_secs(1);
        let mut join = join;
        match tokio::time::timeout(margin, &mut join).await {
            Ok(_) => {}
            Err(_) => {
                join.abort();
                return Err(LinkError::ShutdownTimedOut(margin));
            }
        }
        done_rx.await.unwrap_or(Err(LinkError::Closed))
    }
}

/// Completes when the broker acknowledged a message sent with
/// [`LinkHandle::publish_confirmed`].
#[derive(Debug)]
pub struct Ack(oneshot::Receiver<()>);

impl Future for Ack {
    type Output = Result<(), LinkError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|result| result.map_err(|_| LinkError::Unacknowledged))
    }
}

fn check_filter(filter: &str) -> Result<(), LinkError> {
    if rumqttc::valid_filter(filter) {
        Ok(())
    } else {
        Err(LinkError::InvalidFilter(filter.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(agent_id: &str) -> LinkConfig {
        let presence: PresenceFn = Arc::new(|session| session.to_be_bytes().to_vec());
        LinkConfig::new(
            agent_id,
            BrokerConfig::default(),
            presence.clone(),
            presence,
        )
    }

    fn tree() -> sled::Tree {
        let db = sled::Config::new().temporary(true).open().unwrap();
        db.open_tree("link").unwrap()
    }

    #[test]
    fn starting_outside_a_runtime_is_an_error_not_a_panic() {
        let err = Link::start(config("edge-1"), tree()).unwrap_err();
        assert!(matches!(err, LinkError::NoRuntime), "{err}");
    }

    #[tokio::test]
    async fn bad_agent_ids_and_filters_are_refused_at_start() {
        let err = Link::start(config("edge/1"), tree()).unwrap_err();
        assert!(matches!(err, LinkError::AgentId(_)), "{err}");

        let mut bad_filter = config("edge-1");
        bad_filter.subscriptions = vec!["a/#/b".to_owned()];
        let err = Link::start(bad_filter, tree()).unwrap_err();
        assert!(matches!(err, LinkError::InvalidFilter(_)), "{err}");
    }
}
