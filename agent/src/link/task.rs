//! The link task: connection attempts, the per-connection state machine, and the watchdog.
//!
//! Each attempt builds a fresh rumqttc `EventLoop` whose Last Will carries the attempt's
//! session, so no packet, pending retransmission or buffered event of an old connection can
//! leak into a new one. The event loop is polled by its own small task that forwards every
//! event here; this task never awaits anything that a slow party could hold up. Requests
//! enter rumqttc's channel only through `try_*` calls, and what does not fit waits in a
//! per-connection backlog that is retried after every event (each event means rumqttc took a
//! request or made progress).
//!
//! Acknowledgements are matched by order: this task is the only sender into the connection's
//! request channel, rumqttc turns requests into packets in channel order and reports each
//! with `Outgoing::Publish(pkid)` (or `AwaitAck(pkid)` then `Publish(pkid)` when a packet id
//! is still in use), so the n-th publish event belongs to the n-th submitted publish.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flotilla_shared::wire::{ControlPlaneState, Envelope, Presence, SignedReport, TOPIC_ROOT};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::{
    AsyncClient, ClientError, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing,
    Packet, QoS, Request, SubAck, SubscribeReasonCode,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn, Instrument};

use super::{Backoff, Incoming, LinkError, LinkStats, PresenceFn, INCOMING_OVERFLOW};

/// Requests rumqttc's channel holds before `try_*` reports it full.
const REQUEST_CAPACITY: usize = 64;
/// Events the poller may get ahead of this task.
const EVENT_CAPACITY: usize = 64;
/// Key of the session counter in the session tree.
const SESSION_KEY: &[u8] = b"session";

/// What a handle asks of the task through the bounded queue.
pub(super) enum Command {
    /// Publish a message; `ack` completes on the broker's PubAck.
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos: QoS,
        retain: bool,
        ack: Option<oneshot::Sender<()>>,
    },
}

/// A clean shutdown: publish `offline`, disconnect, report on `done`.
pub(super) struct ShutdownRequest {
    pub offline: Vec<u8>,
    pub done: oneshot::Sender<Result<(), LinkError>>,
}

/// What woke the connection loop.
enum Step {
    Event(Option<Result<Event, ConnectionError>>),
    Command(Option<Command>),
    /// `false` when every handle is gone.
    SubscriptionsChanged(bool),
    /// `None` when every handle is gone.
    Shutdown(Option<ShutdownRequest>),
    OfflineAcked(bool),
    ShutdownTimedOut,
    Silent,
    Delivered,
}

/// How one connection ended.
enum Outcome {
    /// Lost or never made; reconnect after a delay.
    Lost { up_for: Duration },
    /// Shut down cleanly or abandoned by every handle; the task ends.
    Finished,
}

/// The state of one link across connections.
pub(super) struct Task {
    pub agent_id: String,
    pub state_topic: String,
    pub options: MqttOptions,
    pub birth: PresenceFn,
    pub will: PresenceFn,
    pub keep_alive: Duration,
    pub shutdown_timeout: Duration,
    pub own_key: Option<flotilla_shared::PublicKey>,
    pub session_tree: sled::Tree,
    pub session: Arc<AtomicU64>,
    pub commands: mpsc::Receiver<Command>,
    pub subscriptions: watch::Receiver<BTreeSet<String>>,
    pub shutdown: oneshot::Receiver<ShutdownRequest>,
    pub shutdown_seen: bool,
    pub connected: watch::Sender<bool>,
    /// Retained topic of the control plane's [`ControlPlaneState`].
    pub control_plane_topic: String,
    /// The newest control-plane state seen on any connection.
    pub control_plane: Option<ControlPlaneState>,
    /// Whether the control plane said `online` on the current connection.
    pub listening: watch::Sender<bool>,
    pub stats: watch::Sender<LinkStats>,
    pub incoming: mpsc::Sender<Incoming>,
    pub overflow: VecDeque<Incoming>,
    pub backoff: Backoff,
    /// Connection attempts that failed since the last ConnAck.
    pub failed_attempts: u32,
}

impl Task {
    /// Connects, reconnects and serves until shut down or abandoned.
    pub async fn run(mut self) {
        let mut rng = StdRng::from_entropy();
        let mut first_attempt = true;

        loop {
            if !first_attempt {
                let delay = self.backoff.next_delay(&mut rng);
                let mut handles = self.subscriptions.clone();
                debug!(
                    delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "reconnect delayed"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    request = &mut self.shutdown, if !self.shutdown_seen => {
                        self.shutdown_seen = true;
                        if let Ok(request) = request {
                            let _ = request.done.send(Err(LinkError::NotConnected));
                        }
                        break;
                    }
                    // Every handle gone: nobody can use or stop the link any more.
                    _ = all_handles_dropped(&mut handles) => break,
                }
            }
            first_attempt = false;

            match self.connection().await {
                Outcome::Lost { up_for } => self.backoff.connection_ended(up_for),
                Outcome::Finished => break,
            }
        }

        self.set_down();
        debug!("link task ended");
    }

    /// One connection attempt and, if it succeeds, the connection's whole life.
    async fn connection(&mut self) -> Outcome {
        let session = match next_session(&self.session_tree).await {
            Ok(session) => session,
            Err(error) => {
                error!(%error, "cannot persist the session counter, not connecting");
                return Outcome::Lost {
                    up_for: Duration::ZERO,
                };
            }
        };
        self.session.store(session, Ordering::Release);

        let mut options = self.options.clone();
        options.set_last_will(LastWill::new(
            &self.state_topic,
            (self.will)(session),
            QoS::AtLeastOnce,
            true,
        ));
        let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
        let (events_tx, mut events) = mpsc::channel(EVENT_CAPACITY);
        let span = tracing::info_span!("mqtt_poll", agent = %self.agent_id, session);
        let _poller = AbortOnDrop(tokio::spawn(
            poll_events(eventloop, events_tx).instrument(span),
        ));
        let mut conn = Connection::new(client, session);
        debug!(session, "connecting");

        loop {
            let silent_deadline = conn.last_heard + self.keep_alive * 2;
            let watchdog_armed = conn.up.is_some() && !self.keep_alive.is_zero();
            let taking_commands =
                conn.up.is_some() && conn.backlog.is_empty() && conn.closing.is_none();
            let closing_deadline = conn.closing.as_ref().map(|closing| closing.deadline);

            // Branches only pick what happened; the handling below needs all of `self`.
            let step = tokio::select! {
                event = events.recv() => Step::Event(event),
                command = self.commands.recv(), if taking_commands => Step::Command(command),
                changed = self.subscriptions.changed(), if conn.up.is_some() => Step::SubscriptionsChanged(changed.is_ok()),
                request = &mut self.shutdown, if !self.shutdown_seen => Step::Shutdown(request.ok()),
                acked = OptionalAck(conn.closing.as_mut().and_then(|c| c.offline_ack.as_mut())) => Step::OfflineAcked(acked.is_ok()),
                _ = sleep_until_some(closing_deadline) => Step::ShutdownTimedOut,
                _ = tokio::time::sleep_until(silent_deadline), if watchdog_armed => Step::Silent,
                permit = self.incoming.reserve(), if !self.overflow.is_empty() => {
                    match permit {
                        Ok(permit) => {
                            if let Some(message) = self.overflow.pop_front() {
                                permit.send(message);
                            }
                        }
                        Err(_) => self.overflow.clear(),
                    }
                    Step::Delivered
                }
            };

            match step {
                Step::Event(Some(Ok(event))) => {
                    if let Some(outcome) = self.on_event(&mut conn, event) {
                        return outcome;
                    }
                }
                Step::Event(Some(Err(error))) => return self.connection_ended(&mut conn, &error),
                Step::Event(None) => {
                    error!(session, "mqtt poller stopped unexpectedly");
                    return self.lost(&conn);
                }
                Step::Command(Some(Command::Publish {
                    topic,
                    payload,
                    qos,
                    retain,
                    ack,
                })) => {
                    conn.backlog.push_back(Outbound::Publish {
                        topic,
                        payload,
                        qos,
                        retain,
                        ack,
                    });
                }
                Step::Command(None) | Step::SubscriptionsChanged(false) => return self.abandoned(),
                Step::SubscriptionsChanged(true) => self.sync_subscriptions(&mut conn),
                Step::Shutdown(request) => {
                    self.shutdown_seen = true;
                    let Some(request) = request else {
                        return self.abandoned();
                    };
                    if conn.up.is_none() {
                        let _ = request.done.send(Err(LinkError::NotConnected));
                        return Outcome::Finished;
                    }
                    info!(session, "shutting down link");
                    conn.start_closing(&self.state_topic, request, self.shutdown_timeout);
                }
                Step::OfflineAcked(confirmed) => {
                    if let Some(closing) = conn.closing.as_mut() {
                        closing.offline_ack = None;
                        closing.offline_confirmed = confirmed;
                    }
                    conn.backlog.push_back(Outbound::Disconnect);
                }
                Step::ShutdownTimedOut => {
                    warn!(
                        session,
                        "broker did not confirm the shutdown in time, dropping connection"
                    );
                    conn.finish_closing(Err(LinkError::ShutdownTimedOut(self.shutdown_timeout)));
                    self.set_down();
                    return Outcome::Finished;
                }
                Step::Silent => {
                    warn!(
                        session,
                        silent_s = (self.keep_alive * 2).as_secs(),
                        "broker silent, reconnecting"
                    );
                    return self.lost(&conn);
                }
                Step::Delivered => {}
            }

            conn.flush_backlog();
        }
    }

    fn on_event(&mut self, conn: &mut Connection, event: Event) -> Option<Outcome> {
        match event {
            Event::Incoming(packet) => {
                conn.last_heard = Instant::now();
                match packet {
                    Packet::ConnAck(_) => self.on_connected(conn),
                    Packet::Publish(publish) if publish.topic == self.state_topic => {
                        self.on_own_presence(conn, &publish.payload);
                    }
                    Packet::Publish(publish) if publish.topic == self.control_plane_topic => {
                        self.on_control_plane(conn, &publish.payload);
                    }
                    Packet::Publish(publish) => {
                        self.deliver(Incoming {
                            topic: publish.topic,
                            payload: publish.payload,
                        });
                    }
                    Packet::PubAck(puback) => conn.acknowledged(puback.pkid),
                    Packet::SubAck(suback) => conn.subscription_answered(&suback),
                    _ => {}
                }
            }
            Event::Outgoing(outgoing) => match outgoing {
                Outgoing::Publish(pkid) => conn.publish_sent(pkid),
                Outgoing::AwaitAck(pkid) => conn.publish_delayed(pkid),
                Outgoing::Subscribe(pkid) => conn.subscribe_sent(pkid),
                Outgoing::Disconnect if conn.closing.is_some() => {
                    conn.finish_closing(Ok(()));
                    return Some(Outcome::Finished);
                }
                _ => {}
            },
        }
        None
    }

    fn on_connected(&mut self, conn: &mut Connection) {
        conn.up = Some(Instant::now());
        self.failed_attempts = 0;
        info!(session = conn.session, "connected to broker");
        self.connected.send_replace(true);
        self.stats.send_modify(|stats| stats.connections += 1);

        // Subscriptions first: the broker handles one connection's packets in order, so
        // anything sent in answer to the birth finds the subscriptions in place.
        conn.applied.clear();
        self.sync_subscriptions(conn);
        conn.backlog.push_back(self.birth_request(conn.session));
    }

    fn birth_request(&self, session: u64) -> Outbound {
        Outbound::Publish {
            topic: self.state_topic.clone(),
            payload: (self.birth)(session),
            qos: QoS::AtLeastOnce,
            retain: true,
            ack: None,
        }
    }

    /// Brings the connection's subscriptions in line with the wanted set.
    fn sync_subscriptions(&mut self, conn: &mut Connection) {
        let mut wanted = self.subscriptions.borrow_and_update().clone();
        wanted.insert(self.state_topic.clone());
        wanted.insert(self.control_plane_topic.clone());

        for filter in wanted.difference(&conn.applied) {
            conn.backlog.push_back(Outbound::Subscribe(filter.clone()));
        }
        for filter in conn.applied.difference(&wanted) {
            conn.backlog
                .push_back(Outbound::Unsubscribe(filter.clone()));
        }
        conn.applied = wanted;
    }

    /// Watches the agent's own retained state. A will that shows up after this connection's
    /// birth was seen (a late will of an earlier session, or a broker that fired a will on
    /// session takeover) would leave the agent looking offline while it is connected, so the
    /// birth is published again. With `own_key`, presence that key did not sign (another
    /// client's) is ignored, so forged wills cannot make the agent republish its birth.
    fn on_own_presence(&mut self, conn: &mut Connection, payload: &Bytes) {
        let report = SignedReport::decode(payload).ok().filter(|report| {
            self.own_key
                .as_ref()
                .is_none_or(|key| report.is_signed_by(&self.state_topic, key))
        });
        let Some(Ok(envelope)) = report.map(|r| r.envelope::<Presence>()) else {
            debug!(
                session = conn.session,
                "undecodable or foreign message on own state topic ignored"
            );
            return;
        };

        match envelope.body {
            Presence::Online(birth) if birth.session == conn.session => conn.birth_seen = true,
            Presence::Offline { session }
                if conn.birth_seen && session <= conn.session && conn.closing.is_none() =>
            {
                info!(
                    session = conn.session,
                    stale_session = session,
                    "broker shows agent offline, publishing birth again"
                );
                conn.birth_seen = false;
                conn.backlog.push_back(self.birth_request(conn.session));
            }
            _ => {}
        }
    }

    /// Follows the control plane's retained state. Only a message received on this
    /// connection can make it `listening`: after a broker restart the state of the previous
    /// connection says nothing about who is subscribed now.
    fn on_control_plane(&mut self, conn: &Connection, payload: &Bytes) {
        let state = match Envelope::<ControlPlaneState>::decode(payload) {
            Ok(envelope) => envelope.body,
            Err(error) => {
                warn!(session = conn.session, %error, "undecodable control-plane state ignored");
                return;
            }
        };
        if !state.supersedes(self.control_plane.as_ref()) {
            debug!(epoch = state.epoch, "stale control-plane state ignored");
            return;
        }
        self.control_plane = Some(state);
        let was = self.listening.send_replace(state.online);
        if was != state.online {
            info!(
                session = conn.session,
                online = state.online,
                epoch = state.epoch,
                "control plane {}",
                if state.online {
                    "listening, sending telemetry"
                } else {
                    "gone, holding telemetry"
                }
            );
        }
    }

    /// Hands a message to the consumer without ever waiting; see the module docs for the
    /// drop policy.
    fn deliver(&mut self, message: Incoming) {
        let droppable = is_chunk_topic(&message.topic);
        if !droppable && !self.overflow.is_empty() {
            self.push_overflow(message);
            return;
        }

        match self.incoming.try_send(message) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(message)) if droppable => {
                debug!(topic = %message.topic, "consumer slow, chunk dropped");
                self.stats.send_modify(|stats| stats.dropped_incoming += 1);
            }
            Err(mpsc::error::TrySendError::Full(message)) => self.push_overflow(message),
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn push_overflow(&mut self, message: Incoming) {
        self.overflow.push_back(message);
        if self.overflow.len() > INCOMING_OVERFLOW {
            if let Some(oldest) = self.overflow.pop_front() {
                warn!(topic = %oldest.topic, "consumer slow, oldest waiting message dropped");
                self.stats.send_modify(|stats| stats.dropped_incoming += 1);
            }
        }
    }

    fn connection_ended(&mut self, conn: &mut Connection, error: &ConnectionError) -> Outcome {
        if let Some(closing) = &conn.closing {
            // The connection may close right after DISCONNECT went out: a normal end.
            debug!(session = conn.session, %error, "connection closed while shutting down");
            let result = if closing.offline_confirmed {
                Ok(())
            } else {
                Err(LinkError::Unacknowledged)
            };
            conn.finish_closing(result);
            self.set_down();
            return Outcome::Finished;
        }

        if conn.up.is_some() {
            warn!(session = conn.session, %error, "connection lost");
            return self.lost(conn);
        }

        // A broker that is down for a while must not flood the log: the first failure and
        // every tenth after it are worth a warning; a refusal needs an operator every time.
        self.failed_attempts = self.failed_attempts.saturating_add(1);
        let attempts = self.failed_attempts;
        match error {
            ConnectionError::ConnectionRefused(code) => {
                error!(
                    session = conn.session,
                    ?code,
                    "broker refused the connection"
                );
            }
            _ if attempts % 10 == 1 => {
                warn!(session = conn.session, attempts, %error, "cannot reach broker")
            }
            _ => debug!(session = conn.session, attempts, %error, "connect failed"),
        }
        self.lost(conn)
    }

    /// No connection, so nobody to send to.
    fn set_down(&self) {
        self.listening.send_replace(false);
        self.connected.send_replace(false);
    }

    fn lost(&mut self, conn: &Connection) -> Outcome {
        self.set_down();
        Outcome::Lost {
            up_for: conn.up.map(|up| up.elapsed()).unwrap_or_default(),
        }
    }

    fn abandoned(&mut self) -> Outcome {
        debug!("every link handle dropped, ending without disconnect");
        Outcome::Finished
    }
}

/// Resolves once every handle is gone: the subscription sender lives only in the handles.
async fn all_handles_dropped(subscriptions: &mut watch::Receiver<BTreeSet<String>>) {
    while subscriptions.changed().await.is_ok() {}
}

/// Polls one connection's event loop and forwards everything, ending after the first error
/// (polling again would reconnect with a stale will).
async fn poll_events(
    mut eventloop: EventLoop,
    events: mpsc::Sender<Result<Event, ConnectionError>>,
) {
    loop {
        let event = eventloop.poll().await;
        let failed = event.is_err();
        if events.send(event).await.is_err() || failed {
            return;
        }
    }
}

/// Increments and flushes the persisted session counter. An unreadable value is replaced by
/// the clock in milliseconds, far above any count of connections, so numbers still only grow.
async fn next_session(tree: &sled::Tree) -> Result<u64, sled::Error> {
    let tree = tree.clone();
    // The update is quick, but the flush is an fsync: both run on a blocking thread.
    let span = tracing::Span::current();
    let stored = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let value = tree.update_and_fetch(SESSION_KEY, |old| {
            let next = match old.map(<[u8; 8]>::try_from) {
                None => 1,
                Some(Ok(bytes)) => u64::from_be_bytes(bytes).saturating_add(1),
                Some(Err(_)) => {
                    warn!("session counter unreadable, reseeding from the clock");
                    now_ms()
                }
            };
            Some(next.to_be_bytes().to_vec())
        })?;
        tree.flush()?;
        Ok::<_, sled::Error>(value)
    })
    .await
    .map_err(|join| sled::Error::ReportableBug(format!("session counter task failed: {join}")))??;

    let bytes = stored.as_deref().and_then(|v| <[u8; 8]>::try_from(v).ok());
    Ok(bytes.map(u64::from_be_bytes).unwrap_or_else(now_ms))
}

fn now_ms() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// Chunk messages may be dropped for a slow consumer; downloaders re-request them.
fn is_chunk_topic(topic: &str) -> bool {
    topic
        .strip_prefix(TOPIC_ROOT)
        .and_then(|rest| rest.strip_prefix("/bundles/"))
        .is_some_and(|rest| rest.ends_with("/chunks"))
}

/// A request waiting for room in rumqttc's channel.
enum Outbound {
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos: QoS,
        retain: bool,
        ack: Option<oneshot::Sender<()>>,
    },
    Subscribe(String),
    Unsubscribe(String),
    Disconnect,
}

/// A clean shutdown in progress.
struct Closing {
    deadline: Instant,
    offline_ack: Option<oneshot::Receiver<()>>,
    offline_confirmed: bool,
    done: Option<oneshot::Sender<Result<(), LinkError>>>,
}

/// State of one connection; dropped with it.
struct Connection {
    client: AsyncClient,
    session: u64,
    /// When the ConnAck arrived; `None` while connecting.
    up: Option<Instant>,
    /// When the broker last sent anything, PINGRESP included.
    last_heard: Instant,
    backlog: VecDeque<Outbound>,
    /// Ack senders of publishes submitted but not yet turned into packets, in order.
    submitted: VecDeque<Option<oneshot::Sender<()>>>,
    /// A publish rumqttc holds back because its packet id is still in flight.
    delayed: Option<(u16, Option<oneshot::Sender<()>>)>,
    /// Publishes on the wire, by packet id, waiting for PubAck.
    in_flight: HashMap<u16, oneshot::Sender<()>>,
    /// Filters submitted but not yet turned into packets, in order.
    subscribing: VecDeque<String>,
    /// Filters on the wire, by packet id, waiting for SubAck.
    awaiting_suback: HashMap<u16, String>,
    /// Filters subscribed (or being subscribed) on this connection.
    applied: BTreeSet<String>,
    /// Whether this connection's own birth has come back from the broker.
    birth_seen: bool,
    closing: Option<Closing>,
}

impl Connection {
    fn new(client: AsyncClient, session: u64) -> Self {
        Self {
            client,
            session,
            up: None,
            last_heard: Instant::now(),
            backlog: VecDeque::new(),
            submitted: VecDeque::new(),
            delayed: None,
            in_flight: HashMap::new(),
            subscribing: VecDeque::new(),
            awaiting_suback: HashMap::new(),
            applied: BTreeSet::new(),
            birth_seen: false,
            closing: None,
        }
    }

    /// Moves backlog items into rumqttc's channel until it is full.
    fn flush_backlog(&mut self) {
        while let Some(outbound) = self.backlog.pop_front() {
            if let Err(outbound) = self.submit(outbound) {
                self.backlog.push_front(outbound);
                break;
            }
        }
    }

    /// Offers one request to rumqttc without waiting; gives it back when the channel is full.
    fn submit(&mut self, outbound: Outbound) -> Result<(), Outbound> {
        match outbound {
            Outbound::Publish { ack: Some(ack), .. } if ack.is_closed() => {
                // Whoever wanted the confirmation gave up (the outbox does when a connection
                // drops, and sends again from its oldest item): sending now would only put a
                // stale copy ahead of the resent ones.
                Ok(())
            }
            Outbound::Publish {
                topic,
                payload,
                qos,
                retain,
                ack,
            } => match self.client.try_publish(topic, qos, retain, payload) {
                Ok(()) => {
                    self.submitted.push_back(ack);
                    Ok(())
                }
                Err(error) => match refused_request(error) {
                    Some(Request::Publish(publish)) => Err(Outbound::Publish {
                        topic: publish.topic,
                        payload: Vec::from(publish.payload),
                        qos,
                        retain,
                        ack,
                    }),
                    _ => Ok(()),
                },
            },
            Outbound::Subscribe(filter) => {
                match self.client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                    Ok(()) => {
                        self.subscribing.push_back(filter);
                        Ok(())
                    }
                    Err(_) => Err(Outbound::Subscribe(filter)),
                }
            }
            Outbound::Unsubscribe(filter) => match self.client.try_unsubscribe(filter.clone()) {
                Ok(()) => Ok(()),
                Err(_) => Err(Outbound::Unsubscribe(filter)),
            },
            Outbound::Disconnect => self
                .client
                .try_disconnect()
                .map_err(|_| Outbound::Disconnect),
        }
    }

    fn publish_sent(&mut self, pkid: u16) {
        let ack = match self.delayed.take() {
            Some((delayed_pkid, ack)) if delayed_pkid == pkid => ack,
            delayed => {
                self.delayed = delayed;
                self.submitted.pop_front().flatten()
            }
        };
        match ack {
            Some(ack) if pkid != 0 => {
                self.in_flight.insert(pkid, ack);
            }
            // QoS 0 has no acknowledgement: written is as confirmed as it gets.
            Some(ack) => {
                let _ = ack.send(());
            }
            None => {}
        }
    }

    fn publish_delayed(&mut self, pkid: u16) {
        self.delayed = Some((pkid, self.submitted.pop_front().flatten()));
    }

    fn acknowledged(&mut self, pkid: u16) {
        if let Some(ack) = self.in_flight.remove(&pkid) {
            let _ = ack.send(());
        }
    }

    fn subscribe_sent(&mut self, pkid: u16) {
        if let Some(filter) = self.subscribing.pop_front() {
            self.awaiting_suback.insert(pkid, filter);
        }
    }

    fn subscription_answered(&mut self, suback: &SubAck) {
        let Some(filter) = self.awaiting_suback.remove(&suback.pkid) else {
            return;
        };
        if suback
            .return_codes
            .iter()
            .any(|code| matches!(code, SubscribeReasonCode::Failure))
        {
            error!(session = self.session, %filter, "broker refused subscription");
        } else {
            debug!(session = self.session, %filter, "subscribed");
        }
    }

    fn start_closing(&mut self, state_topic: &str, request: ShutdownRequest, timeout: Duration) {
        let (ack_tx, ack_rx) = oneshot::channel();
        // Whatever was queued behind is dropped: the link is going away.
        self.backlog.clear();
        self.backlog.push_back(Outbound::Publish {
            topic: state_topic.to_owned(),
            payload: request.offline,
            qos: QoS::AtLeastOnce,
            retain: true,
            ack: Some(ack_tx),
        });
        self.closing = Some(Closing {
            deadline: Instant::now() + timeout,
            offline_ack: Some(ack_rx),
            offline_confirmed: false,
            done: Some(request.done),
        });
    }

    fn finish_closing(&mut self, result: Result<(), LinkError>) {
        if let Some(done) = self.closing.as_mut().and_then(|c| c.done.take()) {
            let _ = done.send(result);
        }
    }
}

fn refused_request(error: ClientError) -> Option<Request> {
    match error {
        ClientError::Request(request) | ClientError::TryRequest(request) => Some(request),
    }
}

/// Aborts the poller (and so drops the connection without DISCONNECT) when the connection's
/// scope ends, however it ends.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sleeps until `deadline`; pending forever when there is none.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Awaits an optional receiver; pending forever when there is none.
struct OptionalAck<'a>(Option<&'a mut oneshot::Receiver<()>>);

impl std::future::Future for OptionalAck<'_> {
    type Output = Result<(), oneshot::error::RecvError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.0.as_mut() {
            Some(receiver) => std::pin::Pin::new(&mut **receiver).poll(cx),
            None => std::task::Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bundle_chunk_topics_are_droppable() {
        assert!(is_chunk_topic("flotilla/v1/bundles/abc/chunks"));
        assert!(!is_chunk_topic("flotilla/v1/bundles/abc/requests"));
        assert!(!is_chunk_topic("flotilla/v1/agents/edge-1/desired"));
        assert!(!is_chunk_topic("other/bundles/abc/chunks"));
    }

    #[test]
    fn session_counter_grows_and_survives_garbage() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("link").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            assert_eq!(next_session(&tree).await.unwrap(), 1);
            assert_eq!(next_session(&tree).await.unwrap(), 2);
            tree.insert(SESSION_KEY, b"bad".to_vec()).unwrap();
            let reseeded = next_session(&tree).await.unwrap();
            assert!(reseeded > 1_600_000_000_000, "{reseeded}");
            assert_eq!(next_session(&tree).await.unwrap(), reseeded + 1);
        });
    }
}
