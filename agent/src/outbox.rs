//! Telemetry that survives disconnections and restarts: a bounded, ordered, persisted queue.
//!
//! [`Outbox::push`] gives every heartbeat and event the next per-agent sequence number, wraps
//! it in an [`Envelope`] whose `seq` is that number, and stores the encoded envelope in sled;
//! delivery signs each one with the agent's [`Identity`] as it goes out.
//! Numbers are persisted with the item and never reused, so a receiver that sees a gap knows
//! something is missing (a dropped item also leaves a gap). [`Outbox::run_delivery`] sends the
//! items in order on the agent's telemetry topic at QoS 1 whenever the control plane listens
//! (its retained state said `online` on the current connection; a broker acknowledges what it
//! received, not what it forwarded, and forwards nothing to a subscriber it does not yet have)
//! and removes each one only when the broker has acknowledged it; after a reconnect it starts
//! again from the oldest unacknowledged item. Receivers may therefore see an item twice, with the same
//! `seq`, and must deduplicate by it.
//!
//! When the outbox is full, the oldest heartbeat goes first (a new heartbeat counts as the
//! newest one), then the oldest event. Drops are counted in a persisted counter that heartbeats
//! report as `dropped_telemetry`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use flotilla_shared::wire::{check_agent_id, topics, Envelope, Telemetry};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, error, warn, Instrument};

use crate::identity::Identity;
use crate::link::{Ack, LinkError, LinkHandle};

/// Items sent before the oldest one must be acknowledged.
const WINDOW: usize = 32;
/// Key of the next sequence number.
const NEXT_SEQ_KEY: &[u8] = b"next_seq";
/// Key of the drop counter.
const DROPPED_KEY: &[u8] = b"dropped";
/// Prefix of item keys; the big-endian sequence number follows, so keys sort by it.
const ITEM_PREFIX: &[u8] = b"item/";

/// Why the outbox could not store or read telemetry.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// sled failed.
    #[error("telemetry outbox store failed: {0}")]
    Store(#[from] sled::Error),
    /// The agent id cannot be used in a topic.
    #[error("invalid agent id: {0}")]
    AgentId(String),
}

/// The two kinds of telemetry, in the order they are sacrificed when the outbox is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TelemetryKind {
    /// A periodic heartbeat: the next one says the same, so it goes first.
    Heartbeat,
    /// An event: dropped only when no heartbeat is left.
    Event,
}

impl TelemetryKind {
    fn of(telemetry: &Telemetry) -> Self {
        match telemetry {
            Telemetry::Heartbeat(_) => Self::Heartbeat,
            Telemetry::Event(_) => Self::Event,
        }
    }

    fn tag(self) -> u8 {
        match self {
            Self::Heartbeat => b'h',
            Self::Event => b'e',
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            b'h' => Some(Self::Heartbeat),
            b'e' => Some(Self::Event),
            _ => None,
        }
    }
}

/// The persisted telemetry queue of one agent; clones share it.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    tree: sled::Tree,
    agent_id: String,
    topic: String,
    identity: Identity,
    capacity: u64,
    state: Mutex<State>,
    /// Woken on every push.
    added: Notify,
    /// Sequence numbers below this are known to be flushed to disk.
    durable_below: AtomicU64,
    /// Items held, for watchers (tests and metrics).
    held: watch::Sender<u64>,
}

struct State {
    next_seq: u64,
    dropped: u64,
    /// Every stored item by sequence number.
    items: BTreeMap<u64, TelemetryKind>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("Outbox")
            .field("agent_id", &self.inner.agent_id)
            .field("items", &state.items.len())
            .field("next_seq", &state.next_seq)
            .field("dropped", &state.dropped)
            .finish()
    }
}

impl Outbox {
    /// Opens the outbox kept in `tree`, holding at most `capacity` items (at least one).
    ///
    /// Reads every stored item's key, so call it at startup rather than on a hot path.
    /// Entries that cannot be understood are removed with a warning rather than failing the
    /// agent; counters that cannot be read restart from the clock in milliseconds, which is
    /// far above any count of telemetry items, so sequence numbers still only grow.
    pub fn open(
        tree: sled::Tree,
        agent_id: &str,
        identity: Identity,
        capacity: u64,
    ) -> Result<Self, OutboxError> {
        check_agent_id(agent_id).map_err(OutboxError::AgentId)?;

        let mut items = BTreeMap::new();
        for entry in tree.scan_prefix(ITEM_PREFIX) {
            let (key, value) = entry?;
            let seq = key
                .get(ITEM_PREFIX.len()..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes);
            let kind = value.first().copied().and_then(TelemetryKind::from_tag);
            match (seq, kind) {
                (Some(seq), Some(kind)) => {
                    items.insert(seq, kind);
                }
                _ => {
                    warn!(key = ?key, "corrupt telemetry outbox entry removed");
                    tree.remove(key)?;
                }
            }
        }

        let after_items = items.keys().next_back().map_or(1, |seq| seq + 1);
        let next_seq = match read_counter(&tree, NEXT_SEQ_KEY)? {
            Counter::Missing => after_items,
            Counter::Value(next) => next.max(after_items),
            Counter::Corrupt => {
                warn!("telemetry sequence counter unreadable, reseeding from the clock");
                now_ms().max(after_items)
            }
        };
        let dropped = match read_counter(&tree, DROPPED_KEY)? {
            Counter::Value(dropped) => dropped,
            Counter::Missing | Counter::Corrupt => 0,
        };

        let held = watch::Sender::new(items.len() as u64);
        Ok(Self {
            inner: Arc::new(Inner {
                tree,
                agent_id: agent_id.to_owned(),
                topic: topics::agent_telemetry(agent_id),
                identity,
                capacity: capacity.max(1),
                state: Mutex::new(State {
                    next_seq,
                    dropped,
                    items,
                }),
                added: Notify::new(),
                durable_below: AtomicU64::new(0),
                held,
            }),
        })
    }

    /// Stores one telemetry item and returns its sequence number.
    ///
    /// This runs on the caller's thread: sled's inserts only write to its in-memory log
    /// (microseconds); the fsync happens in [`Outbox::run_delivery`] through `flush_async` on
    /// sled's own threads, before any of these items leaves the agent. A crash before that
    /// flush loses items nobody has seen, never a sequence number somebody has.
    ///
    /// The writes are single-key operations in a safe order (the item, then the counter, then
    /// evictions) rather than one `apply_batch`: sled 0.34's batches take a process-wide
    /// exclusive lock that deadlocks against a concurrent `flush`. Recovery copes with a crash
    /// between them: [`Outbox::open`] takes the next sequence number from the items as well as
    /// the counter, an eviction not yet made only leaves one item too many, and the drop
    /// counter may undercount by the items of that instant.
    pub fn push(&self, telemetry: Telemetry) -> Result<u64, OutboxError> {
        let kind = TelemetryKind::of(&telemetry);
        let mut state = self.state();

        let seq = state.next_seq;
        let value = {
            let mut value = vec![kind.tag()];
            value.extend(Envelope::new(&self.inner.agent_id, seq, now_ms(), telemetry).encode());
            value
        };

        // The new item takes part in the choice: a heartbeat arriving at an outbox full of
        // events is itself the oldest heartbeat and is dropped.
        let mut evicted = Vec::new();
        let mut keep_new = true;
        let mut held = state.items.len() as u64 + 1;
        while held > self.inner.capacity {
            let oldest_heartbeat = state
                .items
                .iter()
                .find(|(s, k)| **k == TelemetryKind::Heartbeat && !evicted.contains(*s))
                .map(|(s, _)| *s);
            match (oldest_heartbeat, kind) {
                (Some(victim), _) => evicted.push(victim),
                (None, TelemetryKind::Heartbeat) if keep_new => keep_new = false,
                _ => match state.items.keys().find(|s| !evicted.contains(*s)) {
                    Some(victim) => evicted.push(*victim),
                    None => keep_new = false,
                },
            }
            held -= 1;
        }

        let tree = &self.inner.tree;
        if keep_new {
            tree.insert(item_key(seq).as_slice(), value)?;
        }
        tree.insert(NEXT_SEQ_KEY, &(seq + 1).to_be_bytes())?;
        for victim in &evicted {
            tree.remove(item_key(*victim).as_slice())?;
        }
        let dropped_now = evicted.len() as u64 + u64::from(!keep_new);
        if dropped_now > 0 {
            tree.insert(DROPPED_KEY, &(state.dropped + dropped_now).to_be_bytes())?;
        }

        state.next_seq = seq + 1;
        state.dropped += dropped_now;
        for victim in &evicted {
            state.items.remove(victim);
        }
        if keep_new {
            state.items.insert(seq, kind);
        }
        if dropped_now > 0 {
            warn!(
                seq,
                dropped = dropped_now,
                total_dropped = state.dropped,
                "telemetry outbox full, oldest items dropped"
            );
        }
        self.inner.held.send_replace(state.items.len() as u64);
        drop(state);

        self.inner.added.notify_one();
        Ok(seq)
    }

    /// Items dropped because the outbox was full, ever (persisted).
    pub fn dropped(&self) -> u64 {
        self.state().dropped
    }

    /// Items waiting for the broker's acknowledgement.
    pub fn len(&self) -> usize {
        self.state().items.len()
    }

    /// Whether every item has been acknowledged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number the next pushed item gets.
    pub fn next_seq(&self) -> u64 {
        self.state().next_seq
    }

    /// Sequence numbers and kinds of the items held, oldest first.
    pub fn items(&self) -> Vec<(u64, TelemetryKind)> {
        self.state()
            .items
            .iter()
            .map(|(seq, kind)| (*seq, *kind))
            .collect()
    }

    /// The number of items held, updated on every change.
    pub fn held(&self) -> watch::Receiver<u64> {
        self.inner.held.subscribe()
    }

    /// Spawns [`Outbox::run_delivery`] in a span named after the agent. The task holds a
    /// clone of `link`, so the link is not abandoned while it runs: it ends when the link is
    /// shut down, or when aborted.
    pub fn spawn_delivery(&self, link: LinkHandle) -> JoinHandle<()> {
        let outbox = self.clone();
        let span = tracing::info_span!("telemetry_delivery", agent = %self.inner.agent_id);
        tokio::spawn(async move { outbox.run_delivery(link).await }.instrument(span))
    }

    /// Sends items in order whenever the control plane listens on `link`, removing each once
    /// the broker has acknowledged it, until the link task ends. Only one delivery may run
    /// per outbox.
    ///
    /// When the control plane goes (or the connection drops), items already sent but not yet
    /// acknowledged stay and go out again once it is back: the receiver deduplicates.
    pub async fn run_delivery(&self, link: LinkHandle) {
        let mut listening = link.control_plane_listening();
        loop {
            if listening.wait_for(|up| *up).await.is_err() {
                return;
            }
            match self.deliver_while_listened(&link, &mut listening).await {
                Delivery::Interrupted => debug!(held = self.len(), "telemetry delivery paused"),
                Delivery::LinkClosed => return,
            }
        }
    }

    async fn deliver_while_listened(
        &self,
        link: &LinkHandle,
        listening: &mut watch::Receiver<bool>,
    ) -> Delivery {
        let mut in_flight: VecDeque<(u64, Ack)> = VecDeque::new();
        let mut last_sent = None;

        loop {
            while in_flight.len() < WINDOW {
                let next = match self.next_after(last_sent) {
                    Ok(next) => next,
                    Err(error) => {
                        error!(%error, "cannot read telemetry outbox");
                        return Delivery::Interrupted;
                    }
                };
                let Some((seq, envelope)) = next else { break };
                if let Err(error) = self.make_durable(seq).await {
                    error!(seq, %error, "cannot flush telemetry outbox, holding items back");
                    return Delivery::Interrupted;
                }
                let report = self.inner.identity.seal(&self.inner.topic, envelope);
                match link
                    .publish_confirmed(self.inner.topic.clone(), report)
                    .await
                {
                    Ok(ack) => in_flight.push_back((seq, ack)),
                    Err(LinkError::Closed) => return Delivery::LinkClosed,
                    Err(error) => {
                        error!(seq, %error, "telemetry item can never be sent, dropping it");
                        self.discard(seq);
                    }
                }
                last_sent = Some(seq);
            }

            tokio::select! {
                (seq, acked) = oldest_ack(&mut in_flight) => {
                    in_flight.pop_front();
                    if acked.is_err() {
                        return Delivery::Interrupted;
                    }
                    self.remove(seq);
                }
                _ = self.inner.added.notified(), if in_flight.len() < WINDOW => {}
                changed = listening.changed() => {
                    if changed.is_err() {
                        return Delivery::LinkClosed;
                    }
                    if !*listening.borrow_and_update() {
                        return Delivery::Interrupted;
                    }
                }
            }
        }
    }

    /// The oldest item after `after` (or the oldest of all), with its stored envelope.
    fn next_after(&self, after: Option<u64>) -> Result<Option<(u64, Vec<u8>)>, sled::Error> {
        loop {
            let seq = {
                let state = self.state();
                let mut later = match after {
                    Some(after) => state.items.range(after + 1..),
                    None => state.items.range(..),
                };
                match later.next() {
                    Some((seq, _)) => *seq,
                    None => return Ok(None),
                }
            };
            // An item evicted between the two looks is simply skipped.
            if let Some(value) = self.inner.tree.get(item_key(seq))? {
                return Ok(Some((seq, value.get(1..).unwrap_or_default().to_vec())));
            }
            if self.state().items.contains_key(&seq) {
                self.discard(seq);
            }
        }
    }

    /// Flushes sled if `seq` may not be on disk yet, so no sequence number is ever sent
    /// before it is durable (and so can never be handed out again after a crash).
    async fn make_durable(&self, seq: u64) -> Result<(), sled::Error> {
        if seq < self.inner.durable_below.load(Ordering::Acquire) {
            return Ok(());
        }
        let covered = self.next_seq();
        self.inner.tree.flush_async().await?;
        self.inner
            .durable_below
            .fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }

    /// Forgets an acknowledged item. The removal need not be flushed: if it is lost in a
    /// crash, the item is sent once more and deduplicated by its receiver.
    fn remove(&self, seq: u64) {
        let mut state = self.state();
        if state.items.remove(&seq).is_none() {
            return;
        }
        if let Err(error) = self.inner.tree.remove(item_key(seq)) {
            warn!(seq, %error, "cannot remove acknowledged telemetry item; it will be sent again");
        }
        self.inner.held.send_replace(state.items.len() as u64);
    }

    /// Removes an item that cannot be delivered and counts it as dropped.
    fn discard(&self, seq: u64) {
        let mut state = self.state();
        if state.items.remove(&seq).is_none() {
            return;
        }
        state.dropped += 1;
        let tree = &self.inner.tree;
        let written = tree
            .remove(item_key(seq).as_slice())
            .and_then(|_| tree.insert(DROPPED_KEY, &state.dropped.to_be_bytes()));
        if let Err(error) = written {
            warn!(seq, %error, "cannot record dropped telemetry item");
        }
        self.inner.held.send_replace(state.items.len() as u64);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data: every change to `State`
        // follows a successful store write, so the poisoned state is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

enum Delivery {
    /// The connection dropped or the store failed; wait for the next connection.
    Interrupted,
    /// The link task is gone.
    LinkClosed,
}

/// Waits for the oldest in-flight item's acknowledgement; never completes when none is out.
async fn oldest_ack(in_flight: &mut VecDeque<(u64, Ack)>) -> (u64, Result<(), LinkError>) {
    match in_flight.front_mut() {
        Some((seq, ack)) => (*seq, ack.await),
        None => std::future::pending().await,
    }
}

fn item_key(seq: u64) -> Vec<u8> {
    let mut key = ITEM_PREFIX.to_vec();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

enum Counter {
    Missing,
    Value(u64),
    Corrupt,
}

fn read_counter(tree: &sled::Tree, key: &[u8]) -> Result<Counter, sled::Error> {
    Ok(match tree.get(key)? {
        None => Counter::Missing,
        Some(bytes) => match <[u8; 8]>::try_from(bytes.as_ref()) {
            Ok(bytes) => Counter::Value(u64::from_be_bytes(bytes)),
            Err(_) => Counter::Corrupt,
        },
    })
}

fn now_ms() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::wire::{Event, EventKind, Health, Heartbeat, HostMetrics};

    fn heartbeat() -> Telemetry {
        Telemetry::Heartbeat(Heartbeat {
            session: 1,
            uptime_s: 0,
            active: None,
            health: Health::NoModel,
            host: HostMetrics {
                rss_bytes: 0,
                cpu_percent: 0.0,
            },
            models: Vec::new(),
            dropped_telemetry: 0,
            key_set: 1,
            key_set_digest: None,
        })
    }

    fn event() -> Telemetry {
        Telemetry::Event(Event {
            session: 1,
            rollout: None,
            digest: None,
            kind: EventKind::Verifying,
        })
    }

    fn identity() -> Identity {
        Identity::new(flotilla_shared::SecretKey::from_seed([9; 32]))
    }

    fn tree(db: &sled::Db) -> sled::Tree {
        db.open_tree("outbox").unwrap()
    }

    fn seqs_of(outbox: &Outbox, kind: TelemetryKind) -> Vec<u64> {
        outbox
            .items()
            .into_iter()
            .filter(|(_, k)| *k == kind)
            .map(|(s, _)| s)
            .collect()
    }

    #[test]
    fn full_outbox_drops_heartbeats_before_events_and_counts_drops() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let outbox = Outbox::open(tree(&db), "edge-1", identity(), 4).unwrap();
        use TelemetryKind::{Event as E, Heartbeat as H};

        for item in [event(), heartbeat(), heartbeat(), event()] {
            outbox.push(item).unwrap(); // 1 E, 2 H, 3 H, 4 E
        }
        assert_eq!(outbox.dropped(), 0);

        outbox.push(event()).unwrap(); // evicts heartbeat 2
        assert_eq!(outbox.items(), [(1, E), (3, H), (4, E), (5, E)]);

        outbox.push(heartbeat()).unwrap(); // evicts heartbeat 3, the oldest heartbeat
        assert_eq!(outbox.items(), [(1, E), (4, E), (5, E), (6, H)]);

        outbox.push(event()).unwrap(); // evicts heartbeat 6
        assert_eq!(seqs_of(&outbox, H), Vec::<u64>::new());

        let seq = outbox.push(heartbeat()).unwrap(); // only events held: the new heartbeat goes
        assert_eq!(seq, 8);
        assert_eq!(outbox.items(), [(1, E), (4, E), (5, E), (7, E)]);

        outbox.push(event()).unwrap(); // no heartbeat left: oldest event 1 goes
        assert_eq!(outbox.items(), [(4, E), (5, E), (7, E), (9, E)]);
        assert_eq!(outbox.dropped(), 5);
    }

    #[test]
    fn sequence_numbers_and_drops_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let outbox = Outbox::open(tree(&db), "edge-1", identity(), 2).unwrap();
            for _ in 0..3 {
                outbox.push(heartbeat()).unwrap();
            }
            outbox.remove(3);
            db.flush().unwrap();
        }

        let db = sled::open(dir.path()).unwrap();
        let outbox = Outbox::open(tree(&db), "edge-1", identity(), 2).unwrap();
        assert_eq!(outbox.items(), [(2, TelemetryKind::Heartbeat)]);
        assert_eq!(outbox.dropped(), 1);
        assert_eq!(
            outbox.push(event()).unwrap(),
            4,
            "acknowledged number 3 must not come back"
        );
    }

    #[test]
    fn stored_envelope_carries_the_outbox_sequence_number() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let outbox = Outbox::open(tree(&db), "edge-1", identity(), 10).unwrap();
        outbox.push(heartbeat()).unwrap();
        let seq = outbox.push(event()).unwrap();

        let (found, bytes) = outbox.next_after(Some(1)).unwrap().unwrap();
        assert_eq!(found, seq);
        let envelope = Envelope::<Telemetry>::decode(&bytes).unwrap();
        assert_eq!((envelope.seq, envelope.from.as_str()), (seq, "edge-1"));
        assert_eq!(envelope.body, event());
    }

    #[test]
    fn corrupt_entries_and_counters_do_not_stop_the_agent() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = tree(&db);
        {
            let outbox = Outbox::open(tree.clone(), "edge-1", identity(), 10).unwrap();
            outbox.push(event()).unwrap();
        }
        tree.insert(b"item/short", b"e".to_vec()).unwrap();
        tree.insert(item_key(50), b"?junk".to_vec()).unwrap();
        tree.insert(NEXT_SEQ_KEY, b"x".to_vec()).unwrap();

        let outbox = Outbox::open(tree.clone(), "edge-1", identity(), 10).unwrap();
        assert_eq!(outbox.items(), [(1, TelemetryKind::Event)]);
        assert!(outbox.next_seq() > 1_600_000_000_000);
        assert!(tree.get(item_key(50)).unwrap().is_none());
    }

    #[test]
    fn invalid_agent_id_is_refused() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        assert!(matches!(
            Outbox::open(tree(&db), "a/b", identity(), 10),
            Err(OutboxError::AgentId(_))
        ));
    }
}
