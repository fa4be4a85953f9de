//! The hub: the server's state and every rule that changes it.
//!
//! One [`Hub`] sits behind a mutex; the MQTT input task, the API handlers and the clock
//! each lock it briefly, call one method, and leave. Methods never wait on the network:
//! messages to publish go to an unbounded queue a publisher task drains, so the MQTT event
//! loop can never end up waiting on itself. Every method writes what it changed to the
//! [`Store`] before returning; API handlers then [`Store::flush`] before answering.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use flotilla_shared::keyset::Accepted;
use flotilla_shared::verify::{VerifiedBundle, Verifier};
use flotilla_shared::wire::{
    topics, Birth, DesiredBundle, DesiredState, Envelope, Event, EventKind, Heartbeat, Presence,
    SignedDesiredState, SignedReport, Telemetry, WireError,
};
use flotilla_shared::{
    KeyId, KeySetError, PublicKey, SecretKey, Sha256Digest, SignedKeySet, TrustedKeys,
};
use tokio::sync::mpsc;

use super::registry::{AgentRecord, PresenceChange, Sequence};
use super::store::{BundleRecord, EventRecord, Store};
use crate::rollout::{
    check_overlap, Action, BundleRef, Rollout, RolloutError, RolloutEvent, RolloutSpec,
    RolloutState, Target,
};

/// The sender name the server puts in its envelopes.
pub const SERVER_ID: &str = "control-plane";

/// A message for the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Whether the broker keeps it for later subscribers.
    pub retain: bool,
}

/// Why a request to the hub was refused.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The request is wrong; the message says how.
    #[error("{0}")]
    Invalid(String),
    /// What it names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// It conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// The server failed.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Messages the server counted and dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Dropped {
    /// Not decodable, or on a topic the server does not serve.
    pub malformed: u64,
    /// Sent on one agent's topic in the name of another.
    pub foreign: u64,
    /// Not signed by the key registered for the agent (unsigned, forged, or from a device
    /// that came back with a new key), or telemetry from an agent that never registered.
    pub unauthenticated: u64,
    /// Telemetry redelivered (sequence number already seen).
    pub duplicate: u64,
}

/// An operator's action on a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steer {
    /// Stop before the next step.
    Pause,
    /// Continue a paused rollout.
    Resume,
    /// Stop where it is.
    Abort,
    /// Send every updated agent back.
    Rollback,
}

/// The server's state.
pub struct Hub {
    store: Store,
    /// Every control-plane key the chain has used, the first one included.
    keys: BTreeMap<KeyId, SecretKey>,
    /// The first control-plane key: what agents on no key set, or one before any change,
    /// trust.
    first_key: KeyId,
    /// Key set versions that named a new control-plane key, in order.
    key_changes: Vec<(u64, KeyId)>,
    /// Where control-plane keys live (the data directory).
    key_dir: PathBuf,
    /// The publisher keys trusted now (`None`: none configured, every upload is refused).
    trust: Option<TrustedKeys>,
    /// Every key set kept, oldest first; what desired states carry.
    key_sets: Vec<SignedKeySet>,
    agent_timeout_ms: u64,
    assign_new_agents: bool,
    agents: BTreeMap<String, AgentRecord>,
    bundles: BTreeMap<Sha256Digest, BundleRecord>,
    desired: BTreeMap<String, DesiredState>,
    rollouts: BTreeMap<String, Rollout>,
    out: mpsc::UnboundedSender<Outgoing>,
    seq: u64,
    dropped: Dropped,
    admission: Admission,
    /// Agents waiting to be accepted, by id: the latest valid birth of each that could not
    /// register (see [`Hub::accept_agent`]).
    pending: BTreeMap<String, PendingAgent>,
    /// At most this many are held ([`MAX_PENDING`]; less in tests).
    pending_limit: usize,
    /// Per agent, the release it was last not given because it expired: `release_expired`
    /// is logged once for each, not every time the agent is considered.
    expired_notices: BTreeMap<String, String>,
    /// Keys approved ahead (kept in the store): for an agent not registered, a birth with
    /// that key registers whatever the admission and one with another key waits; for a
    /// registered one, a device with that key replaces it once it is offline and in no active
    /// rollout.
    approvals: BTreeMap<String, KeyId>,
    /// Per agent, the key set digest it was last logged for as following another chain:
    /// `key_set_forked` is logged once for each, not on every heartbeat.
    fork_notices: BTreeMap<String, Sha256Digest>,
}

/// What approving a key for an agent did.
#[derive(Debug)]
pub enum Approval {
    /// The agent was waiting with that key: it is registered now.
    Accepted(Box<AgentRecord>),
    /// The agent does not wait with that key: a device registers with it when it next
    /// connects (replacing a registered agent that is offline and in no active rollout).
    Ahead,
}

/// Most agents held waiting for acceptance; births of further unknown agents are dropped
/// without being held, so a flood of made-up ids cannot exhaust memory.
pub const MAX_PENDING: usize = 10_000;

/// Largest birth held for acceptance, encoded: a real one (labels and capabilities) is well
/// under 1 KiB. With [`MAX_PENDING`] this bounds what pending agents hold to about 160 MiB
/// whatever clients on the broker send.
pub const MAX_PENDING_BIRTH_BYTES: usize = 16 * 1024;

/// A pending agent offering yet another key is logged again only this long after it was
/// last logged, so a client cycling through keys cannot flood the event log.
const PENDING_LOG_INTERVAL_MS: u64 = 10 * 60 * 1000;

/// Who may register a new agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Admission {
    /// An agent's first birth registers the key it names (trust on first use).
    #[default]
    Open,
    /// A new agent waits until an admin accepts the key it offers.
    Accept,
}

/// A birth held until an admin accepts the key it names.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct PendingAgent {
    /// Agent id.
    pub id: String,
    /// Id of the key it offers (SHA-256 of the raw key), hex.
    pub key_id: String,
    /// The key it offers, hex.
    #[schema(value_type = String)]
    pub identity: PublicKey,
    /// Id of the key registered for it, hex, when it is a known agent offering another key
    /// (a device that was reset, or an impostor).
    pub registered_key_id: Option<String>,
    /// Id of the key approved ahead for it, hex, when it offers another one.
    pub approved_key_id: Option<String>,
    /// Labels its birth gives.
    pub labels: BTreeMap<String, String>,
    /// When its first birth with this key arrived, Unix milliseconds.
    pub since_ms: u64,
    #[serde(skip)]
    birth: Birth,
    /// Whether the will of the held birth's session came: the agent is not connected.
    #[serde(skip)]
    gone: bool,
    /// When it was last logged.
    #[serde(skip)]
    logged_ms: u64,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("agents", &self.agents.len())
            .field("bundles", &self.bundles.len())
            .field("rollouts", &self.rollouts.len())
            .finish_non_exhaustive()
    }
}

/// What the hub needs from the configuration.
#[derive(Debug)]
pub struct HubSettings {
    /// The key desired states are signed with.
    pub key: SecretKey,
    /// Publisher keys uploads must be signed with.
    pub publishers: Vec<flotilla_shared::PublicKey>,
    /// Distinct publisher signatures an upload needs.
    pub threshold: usize,
    /// Which key set `publishers` and `threshold` are.
    pub key_set: u64,
    /// Where the keys named by key sets are (`control-plane-ID.key`).
    pub key_dir: PathBuf,
    /// Silence after which an agent counts as offline, milliseconds.
    pub agent_timeout_ms: u64,
    /// Whether agents with no desired state are given the fleet's current release (see
    /// [`Hub::release_for`]).
    pub assign_new_agents: bool,
    /// Who may register a new agent.
    pub admission: Admission,
}

impl Hub {
    /// Loads the state from `store`.
    pub fn load(
        store: Store,
        settings: HubSettings,
        out: mpsc::UnboundedSender<Outgoing>,
        now_ms: u64,
    ) -> Result<Self> {
        let agents = store
            .agents()?
            .into_iter()
            .map(|a| (a.id.clone(), a))
            .collect();
        let bundles = store
            .bundles()?
            .into_iter()
            .map(|b| (b.digest, b))
            .collect();
        let desired = store
            .desired_states()?
            .into_iter()
            .map(|d| (d.agent.clone(), d))
            .collect();
        let approvals = store.approvals()?;
        let rollouts = store
            .rollouts()?
            .into_iter()
            .map(|r| (r.id().to_owned(), r))
            .collect();
        let trust = load_trust(&store, &settings)?;
        // Every kept set goes to agents, those at or below the configured version too: agents
        // configured with older keys still need them, and their control-plane keys sign.
        let key_sets = store.key_sets()?;
        let first_key = settings.key.public().id();
        let mut keys = BTreeMap::from([(first_key, settings.key)]);
        let mut key_changes = Vec::new();
        for signed in &key_sets {
            let set = signed
                .key_set()
                .context("a key set kept in the store does not decode")?;
            let Some(public) = set.control_plane else {
                continue;
            };
            if let std::collections::btree_map::Entry::Vacant(slot) = keys.entry(public.id()) {
                slot.insert(load_next_key(&settings.key_dir, &public).with_context(|| {
                    format!(
                        "key set {} names control-plane key {}",
                        set.version,
                        public.id()
                    )
                })?);
            }
            key_changes.push((set.version, public.id()));
        }
        Ok(Self {
            store,
            keys,
            first_key,
            key_changes,
            key_dir: settings.key_dir,
            trust,
            key_sets,
            agent_timeout_ms: settings.agent_timeout_ms,
            assign_new_agents: settings.assign_new_agents,
            agents,
            bundles,
            desired,
            rollouts,
            out,
            // Envelope sequence numbers only need to grow; starting from the clock keeps
            // them growing across restarts without storing a counter.
            seq: now_ms,
            dropped: Dropped::default(),
            admission: settings.admission,
            pending: BTreeMap::new(),
            pending_limit: MAX_PENDING,
            expired_notices: BTreeMap::new(),
            approvals,
            fork_notices: BTreeMap::new(),
        })
    }

    /// The store, for flushing outside the lock.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Messages counted and dropped so far.
    pub fn dropped(&self) -> Dropped {
        self.dropped
    }

    // ---- MQTT input ------------------------------------------------------------------

    /// Handles a message on an agent topic. Malformed messages, messages in another agent's
    /// name and messages not signed by the agent's registered key are counted and dropped.
    ///
    /// An agent registers its key with its first birth (trust on first use), or, with
    /// [`Admission::Accept`], once an admin accepts it; from then on only that key speaks for
    /// it, until an admin accepts another key for it or forgets it.
    pub fn on_agent_message(&mut self, topic: &str, payload: &[u8], now_ms: u64) {
        let Some(agent) = topics::agent_of(topic) else {
            self.dropped.malformed += 1;
            return;
        };
        if flotilla_shared::wire::check_agent_id(agent).is_err() {
            self.dropped.malformed += 1;
            return;
        }
        let agent = agent.to_owned();
        let result = match SignedReport::decode(payload) {
            Err(WireError::Unsigned) => Err(Drop::Unauthenticated("unsigned".into())),
            Err(e) => Err(Drop::Malformed(e.to_string())),
            Ok(report) if topic == topics::agent_state(&agent) => {
                match report.envelope::<Presence>() {
                    Ok(env) if env.from != agent => Err(Drop::Foreign),
                    Ok(env) => self
                        .authenticate(&agent, topic, &report, Some(&env.body), now_ms)
                        .map(|()| self.on_presence(&agent, env.body, now_ms)),
                    Err(e) => Err(Drop::Malformed(e.to_string())),
                }
            }
            Ok(report) if topic == topics::agent_telemetry(&agent) => {
                match report.envelope::<Telemetry>() {
                    Ok(env) if env.from != agent => Err(Drop::Foreign),
                    Ok(env) => self
                        .authenticate(&agent, topic, &report, None, now_ms)
                        .map(|()| self.on_telemetry(&agent, env.seq, env.body, now_ms)),
                    Err(e) => Err(Drop::Malformed(e.to_string())),
                }
            }
            Ok(_) => Err(Drop::Malformed(format!("unexpected topic {topic}"))),
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(agent, error = %format!("{e:#}"), "cannot record an agent message")
            }
            Err(Drop::Foreign) => {
                self.dropped.foreign += 1;
                tracing::warn!(
                    agent,
                    topic,
                    "dropped a message sent in another agent's name"
                );
            }
            Err(Drop::Malformed(why)) => {
                self.dropped.malformed += 1;
                tracing::warn!(agent, topic, why, "dropped a malformed message");
            }
            Err(Drop::Unauthenticated(why)) if self.pending.contains_key(&agent) => {
                // Expected until an admin accepts it; `hold` logged that it waits.
                self.dropped.unauthenticated += 1;
                tracing::debug!(agent, topic, why, "dropped a message of a pending agent");
            }
            Err(Drop::Unauthenticated(why)) => {
                self.dropped.unauthenticated += 1;
                tracing::warn!(
                    agent,
                    topic,
                    why,
                    "dropped a message the agent did not sign"
                );
            }
        }
    }

    /// Checks that `report` is signed by the key registered for `agent`. A birth (`presence`)
    /// of an agent with no key yet registers the key it names, if that key signed it and
    /// admission is open. A valid birth that cannot register (it names another key than the
    /// registered one, or admission waits for an admin) is held as pending (see
    /// [`Hub::hold`]).
    fn authenticate(
        &mut self,
        agent: &str,
        topic: &str,
        report: &SignedReport,
        presence: Option<&Presence>,
        now_ms: u64,
    ) -> Result<(), Drop> {
        let registered = self.agents.get(agent).and_then(|a| a.identity);
        let birth = match presence {
            Some(Presence::Online(birth)) => Some(birth),
            _ => None,
        };
        if let (Some(Presence::Offline { session }), Some(pending)) =
            (presence, self.pending.get_mut(agent))
        {
            // Not heard as the agent's, but accepting it later must not show it connected.
            if pending.birth.session == *session && report.is_signed_by(topic, &pending.identity) {
                pending.gone = true;
            }
        }
        let key = match (registered, birth) {
            (Some(registered), Some(birth)) if birth.identity != registered => {
                if !report.is_signed_by(topic, &birth.identity) {
                    return Err(Drop::Unauthenticated("bad signature".into()));
                }
                if self.approvals.get(agent) == Some(&birth.identity.id()) {
                    match self.replace_approved(agent, &birth.identity, now_ms) {
                        Ok(true) => return Ok(()),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(agent, error = %format!("{e:#}"), "cannot replace an agent by its approved successor");
                        }
                    }
                }
                self.hold(agent, birth, Some(registered), now_ms);
                return Err(Drop::Unauthenticated(format!(
                    "birth names key {}, not the registered {}",
                    birth.identity.id(),
                    registered.id()
                )));
            }
            (Some(registered), _) => registered,
            // A record with no key is from before agents signed: that agent was admitted.
            (None, Some(birth)) if !self.agents.contains_key(agent) => {
                if !report.is_signed_by(topic, &birth.identity) {
                    return Err(Drop::Unauthenticated("bad signature".into()));
                }
                return self.admit(agent, birth, now_ms);
            }
            (None, Some(birth)) => birth.identity,
            (None, None) => return Err(Drop::Unauthenticated("no key registered".into())),
        };
        if !report.is_signed_by(topic, &key) {
            return Err(Drop::Unauthenticated("bad signature".into()));
        }
        Ok(())
    }

    /// Whether a new agent's first valid birth registers: with the key approved ahead for it,
    /// or with none approved under open admission. Otherwise it is held.
    fn admit(&mut self, agent: &str, birth: &Birth, now_ms: u64) -> Result<(), Drop> {
        let offered = birth.identity.id();
        match self.approvals.get(agent) {
            Some(approved) if *approved == offered => {
                let recorded = self.withdraw_approval(agent).and_then(|()| {
                    self.log(
                        Some(agent),
                        None,
                        "agent_accepted",
                        format!("{agent} joined with key {offered}, approved ahead"),
                        serde_json::json!({ "key": offered.0, "approved_ahead": true }),
                        now_ms,
                    )
                });
                if let Err(e) = recorded {
                    tracing::error!(agent, error = %format!("{e:#}"), "cannot record an approved agent");
                }
                Ok(())
            }
            Some(approved) => {
                let approved = *approved;
                self.hold(agent, birth, None, now_ms);
                Err(Drop::Unauthenticated(format!(
                    "birth names key {offered}, not the one approved ahead, {approved}"
                )))
            }
            None if self.admission == Admission::Accept => {
                self.hold(agent, birth, None, now_ms);
                Err(Drop::Unauthenticated("not accepted yet".into()))
            }
            None => Ok(()),
        }
    }

    /// Holds a birth that could not register until an admin accepts it, logging it when the
    /// agent starts waiting and, for each new key it offers, at most once per
    /// [`PENDING_LOG_INTERVAL_MS`]. Beyond [`MAX_PENDING`] agents, new ones are not held, and
    /// a birth larger than [`MAX_PENDING_BIRTH_BYTES`] is never held.
    fn hold(&mut self, agent: &str, birth: &Birth, registered: Option<PublicKey>, now_ms: u64) {
        let size = serde_cbor::to_vec(birth).map_or(usize::MAX, |bytes| bytes.len());
        if size > MAX_PENDING_BIRTH_BYTES {
            tracing::warn!(agent, size, "birth too large to hold for acceptance");
            return;
        }
        let offered = birth.identity;
        let earlier = self.pending.get(agent);
        if earlier.is_none() && self.pending.len() >= self.pending_limit {
            tracing::warn!(
                agent,
                "too many agents waiting for acceptance; not holding another"
            );
            return;
        }
        let same_key = earlier.is_some_and(|p| p.identity == offered);
        let since_ms = earlier.filter(|_| same_key).map_or(now_ms, |p| p.since_ms);
        let log = match earlier {
            None => true,
            Some(_) if same_key => false,
            Some(p) => now_ms.saturating_sub(p.logged_ms) >= PENDING_LOG_INTERVAL_MS,
        };
        let logged_ms = match earlier {
            Some(p) if !log => p.logged_ms,
            _ => now_ms,
        };
        self.pending.insert(
            agent.to_owned(),
            PendingAgent {
                id: agent.to_owned(),
                key_id: offered.id().0.to_hex(),
                identity: offered,
                registered_key_id: registered.map(|k| k.id().0.to_hex()),
                approved_key_id: self.approvals.get(agent).map(|k| k.0.to_hex()),
                labels: birth.labels.clone(),
                since_ms,
                birth: birth.clone(),
                gone: false,
                logged_ms,
            },
        );
        if !log {
            return;
        }
        let (kind, message) = match registered {
            Some(registered) => (
                "agent_key_refused",
                format!(
                    "{agent} connected with key {}, not its registered key {}: its reports are \
                     refused. If the device was reset, accept its new key",
                    offered.id(),
                    registered.id()
                ),
            ),
            None => (
                "agent_pending",
                format!(
                    "{agent} asks to join with key {}; it is heard only once an admin accepts it",
                    offered.id()
                ),
            ),
        };
        let detail = serde_json::json!({
            "offered": offered.id().0,
            "registered": registered.map(|k| k.id().0),
        });
        if let Err(e) = self.log(Some(agent), None, kind, message, detail, now_ms) {
            tracing::error!(agent, error = %format!("{e:#}"), "cannot record a pending agent");
        }
    }

    /// At most `limit` agents waiting for acceptance, by id, from the one after `after`.
    pub fn pending_agents(&self, after: Option<&str>, limit: usize) -> Vec<PendingAgent> {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, |id| Bound::Excluded(id.to_owned()));
        self.pending
            .range((from, Bound::Unbounded))
            .take(limit)
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// How many agents wait for acceptance.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Approves `key_id` for agent `id`: accepts it if the agent waits with that key (see
    /// [`Hub::accept_agent`]), or else keeps the approval so the next birth with that key
    /// registers whatever the admission. So an agent whose pending birth another client keeps
    /// replacing with its own key can still be admitted, and a replacement device can be
    /// approved before it is installed: for a registered agent it takes the id over once
    /// the agent is offline and in no active rollout (see [`Hub::forget_agent`]).
    pub fn approve_agent(
        &mut self,
        id: &str,
        key_id: &KeyId,
        now_ms: u64,
    ) -> Result<Approval, HubError> {
        if self.pending.get(id).map(|p| p.identity.id()) == Some(*key_id) {
            let record = self.accept_agent(id, key_id, now_ms)?;
            return Ok(Approval::Accepted(Box::new(record)));
        }
        let registered = self.agents.get(id).and_then(|a| a.identity);
        if registered.is_some_and(|key| key.id() == *key_id) {
            return Err(HubError::Conflict(format!(
                "{id} is registered with key {key_id} already"
            )));
        }
        flotilla_shared::wire::check_agent_id(id).map_err(HubError::Invalid)?;
        self.store.put_approval(id, Some(key_id))?;
        self.approvals.insert(id.to_owned(), *key_id);
        if let Some(pending) = self.pending.get_mut(id) {
            pending.approved_key_id = Some(key_id.0.to_hex());
        }
        self.log(
            Some(id),
            None,
            "agent_approved",
            format!(
                "{id} approved ahead with key {key_id}: it registers when it next connects with it"
            ),
            serde_json::json!({ "key": key_id.0 }),
            now_ms,
        )?;
        Ok(Approval::Ahead)
    }

    /// Replaces registered agent `agent` by the device whose `key` was approved ahead for its
    /// id, if the agent can be forgotten now (offline, in no active rollout): the caller then
    /// applies the device's birth, which registers `key`. `false` if it cannot be yet.
    fn replace_approved(&mut self, agent: &str, key: &PublicKey, now_ms: u64) -> Result<bool> {
        if self.check_forgettable(agent).is_err() {
            return Ok(false);
        }
        self.remove_agent(agent)?;
        self.withdraw_approval(agent)?;
        self.log(
            Some(agent),
            None,
            "agent_accepted",
            format!(
                "{agent} joined with key {}, approved ahead, replacing its earlier registration",
                key.id()
            ),
            serde_json::json!({ "key": key.id().0, "approved_ahead": true, "replaced": true }),
            now_ms,
        )?;
        Ok(true)
    }

    /// Drops the key approved ahead for `id`, if any.
    fn withdraw_approval(&mut self, id: &str) -> Result<()> {
        if self.approvals.remove(id).is_some() {
            self.store.put_approval(id, None)?;
        }
        Ok(())
    }

    /// Keys approved ahead and not used yet, by agent id.
    pub fn approvals(&self) -> &BTreeMap<String, KeyId> {
        &self.approvals
    }

    /// Registers the key a pending agent offers, which must be `key_id` (so what an admin
    /// accepts is what they looked at), and applies its birth. A known agent offering a new
    /// key (a device that was reset) must be offline and in no active rollout; it is replaced,
    /// as if forgotten, and joins anew.
    pub fn accept_agent(
        &mut self,
        id: &str,
        key_id: &KeyId,
        now_ms: u64,
    ) -> Result<AgentRecord, HubError> {
        let pending = self
            .pending
            .get(id)
            .ok_or_else(|| HubError::NotFound(format!("no agent {id:?} waits for acceptance")))?;
        if pending.identity.id() != *key_id {
            return Err(HubError::Conflict(format!(
                "{id} offers key {}, not {key_id}; look at it again",
                pending.identity.id()
            )));
        }
        let replaced = match self.agents.get(id) {
            Some(_) => {
                self.check_forgettable(id)?;
                self.remove_agent(id)?;
                true
            }
            None => false,
        };
        let pending = self
            .pending
            .remove(id)
            .expect("invariant: looked up above under the same lock");
        self.withdraw_approval(id)?;
        self.log(
            Some(id),
            None,
            "agent_accepted",
            format!(
                "{id} accepted with key {}{}",
                pending.identity.id(),
                if replaced {
                    ", replacing its earlier registration"
                } else {
                    ""
                }
            ),
            serde_json::json!({ "key": pending.identity.id().0, "replaced": replaced }),
            now_ms,
        )?;
        let session = pending.birth.session;
        self.on_presence(id, Presence::Online(pending.birth), now_ms)?;
        if pending.gone {
            self.on_presence(id, Presence::Offline { session }, now_ms)?;
        }
        self.agent(id)
    }

    fn on_presence(&mut self, agent: &str, presence: Presence, now_ms: u64) -> Result<()> {
        let record = self
            .agents
            .entry(agent.to_owned())
            .or_insert_with(|| AgentRecord::new(agent, now_ms));
        let change = match &presence {
            Presence::Online(birth) => record.on_birth(birth, now_ms),
            Presence::Offline { session } => record.on_offline(*session, now_ms),
        };
        let record = record.clone();
        self.notice_key_set_fork(&record, now_ms)?;
        if matches!(presence, Presence::Online(_)) && change != PresenceChange::Stale {
            // The agent is back with its registered key (or just registered): a birth held
            // under its id is an impostor's or out of date, and accepting it later would
            // replace the real device.
            self.pending.remove(agent);
        }
        self.store.put_agent(&record)?;
        self.presence_changed(&record, change, now_ms)
    }

    fn presence_changed(
        &mut self,
        record: &AgentRecord,
        change: PresenceChange,
        now_ms: u64,
    ) -> Result<()> {
        let (online, kind) = match change {
            PresenceChange::Stale | PresenceChange::Reconnected => return Ok(()),
            PresenceChange::CameOnline => (true, "agent_online"),
            PresenceChange::WentOffline => (false, "agent_offline"),
        };
        self.log(
            Some(&record.id),
            None,
            kind,
            format!(
                "{} is {} (session {})",
                record.id,
                if online { "online" } else { "offline" },
                record.session
            ),
            serde_json::json!({ "session": record.session }),
            now_ms,
        )?;
        for id in self.rollouts_of(&record.id) {
            let actions = self
                .rollout_mut(&id)
                .on_presence(&record.id, online, now_ms);
            self.carry_out(&id, actions, now_ms)?;
        }
        if online {
            self.assign_newcomers(Some(&record.id), now_ms)?;
        }
        Ok(())
    }

    /// The digest of this server's key set at the version `record` reports, when the agent
    /// reports another digest for it: it follows another chain of key sets (a fork, which
    /// only holders of a threshold of publisher keys could make), so it trusts keys this
    /// server does not.
    pub fn key_set_fork(&self, record: &AgentRecord) -> Option<Sha256Digest> {
        let reported = record.key_set_digest?;
        let ours = self
            .key_sets
            .iter()
            .find(|set| set.version == record.key_set)?
            .digest();
        (ours != reported).then_some(ours)
    }

    /// Logs an agent found on another chain of key sets, once per digest it reports.
    fn notice_key_set_fork(&mut self, record: &AgentRecord, now_ms: u64) -> Result<()> {
        let (Some(ours), Some(reported)) = (self.key_set_fork(record), record.key_set_digest)
        else {
            self.fork_notices.remove(&record.id);
            return Ok(());
        };
        if self.fork_notices.get(&record.id) == Some(&reported) {
            return Ok(());
        }
        self.fork_notices.insert(record.id.clone(), reported);
        tracing::error!(
            agent = %record.id,
            key_set = record.key_set,
            %reported,
            expected = %ours,
            "agent trusts a key set this server did not issue"
        );
        self.log(
            Some(&record.id),
            None,
            "key_set_forked",
            format!(
                "{} trusts key set {} with digest {reported}, not this server's {ours}: it \
                 follows another chain of key sets, signed by publisher keys; find out who \
                 signed it",
                record.id, record.key_set
            ),
            serde_json::json!({
                "key_set": record.key_set,
                "reported": reported,
                "expected": ours,
            }),
            now_ms,
        )
    }

    /// The release an agent with `labels` joins the fleet at: the bundle of the rollout,
    /// among the completed ones whose selector matches it, that completed last.
    pub fn release_for(&self, labels: &BTreeMap<String, String>) -> Option<&Rollout> {
        self.rollouts
            .values()
            .filter_map(|r| match r.state() {
                RolloutState::Completed { at_ms } => Some((*at_ms, r)),
                _ => None,
            })
            .filter(|(_, r)| r.spec().selector.matches(labels))
            .max_by(|(a, r), (b, q)| a.cmp(b).then_with(|| r.id().cmp(q.id())))
            .map(|(_, r)| r)
    }

    /// Gives online agents (`only` that one, if given) the fleet's current release for their
    /// labels when no rollout decides what they run: those that never had a desired state (a
    /// new or replaced device serves what its peers serve without waiting for the next
    /// rollout), and those whose desired state came from here before, which so follow the
    /// release as rollouts complete. An agent that joins while a rollout that would reach it
    /// runs is given the release it would replace, and the new one if it completes. Agents a
    /// rollout set are never moved.
    fn assign_newcomers(&mut self, only: Option<&str>, now_ms: u64) -> Result<()> {
        if !self.assign_new_agents {
            return Ok(());
        }
        let mut expired = Vec::new();
        let newcomers: Vec<(String, String, DesiredBundle, bool)> = self
            .agents
            .values()
            .filter(|a| only.is_none_or(|id| id == a.id))
            // One an active rollout holds (it joined before that rollout started) is the
            // rollout's to move.
            .filter(|a| a.online && self.rollouts_of(&a.id).is_empty())
            .filter_map(|a| {
                // `None`: never had one; `Some(None)`: a state given here, no bundle;
                // `Some(Some(d))`: running `d` by a state given here.
                let follows = match self.desired.get(&a.id) {
                    None => None,
                    Some(state) if state.rollout.is_none() => {
                        Some(state.bundle.as_ref().map(|b| b.digest))
                    }
                    Some(_) => return None,
                };
                let release = self.release_for(&a.labels)?;
                if follows.flatten() == Some(release.bundle().digest) {
                    return None;
                }
                // A release from before a key rotation that its keys did not survive, or one
                // that has expired, would only be refused.
                let trusted = self
                    .trust
                    .as_ref()
                    .is_some_and(|keys| self.trusted_by(keys, &release.bundle().digest));
                if !trusted {
                    return None;
                }
                if self.expired(&release.bundle().digest, now_ms) {
                    expired.push((
                        a.id.clone(),
                        release.id().to_owned(),
                        release.bundle().clone(),
                    ));
                    return None;
                }
                Some((
                    a.id.clone(),
                    release.id().to_owned(),
                    release.bundle().clone(),
                    follows.is_some(),
                ))
            })
            .collect();
        for (agent, rollout, bundle) in expired {
            if self.expired_notices.get(&agent) == Some(&rollout) {
                continue;
            }
            self.expired_notices.insert(agent.clone(), rollout.clone());
            self.log(
                Some(&agent),
                None,
                "release_expired",
                format!(
                    "{agent} was not given {}@{}, the release rollout {rollout} completed for \
                     agents like it: it has expired, and agents refuse it. Roll out a newer one",
                    bundle.name, bundle.version
                ),
                serde_json::json!({ "bundle": bundle, "from_rollout": rollout }),
                now_ms,
            )?;
        }
        for (agent, rollout, bundle, follows) in newcomers {
            let why = if follows {
                "follows the fleet's release"
            } else {
                "has no desired state"
            };
            self.log(
                Some(&agent),
                None,
                "agent_assigned",
                format!(
                    "{agent} {why}; given {}@{}, the release rollout {rollout} completed for \
                     agents like it",
                    bundle.name, bundle.version
                ),
                serde_json::json!({ "bundle": bundle, "from_rollout": rollout, "follows": follows }),
                now_ms,
            )?;
            self.set_desired(&agent, Some(bundle), None, now_ms)?;
        }
        Ok(())
    }

    fn on_telemetry(
        &mut self,
        agent: &str,
        seq: u64,
        telemetry: Telemetry,
        now_ms: u64,
    ) -> Result<()> {
        let record = self
            .agents
            .entry(agent.to_owned())
            .or_insert_with(|| AgentRecord::new(agent, now_ms));
        match record.on_sequence(seq, now_ms) {
            Sequence::Duplicate => {
                self.dropped.duplicate += 1;
                return Ok(());
            }
            Sequence::Fresh { missing } if missing > 0 => {
                tracing::warn!(agent, missing, seq, "telemetry sequence gap");
            }
            Sequence::Fresh { .. } => {}
        }
        match telemetry {
            Telemetry::Heartbeat(heartbeat) => self.on_heartbeat(agent, &heartbeat, now_ms),
            Telemetry::Event(event) => self.on_event(agent, &event, now_ms),
        }
    }

    fn on_heartbeat(&mut self, agent: &str, heartbeat: &Heartbeat, now_ms: u64) -> Result<()> {
        let record = self
            .agents
            .get_mut(agent)
            .expect("invariant: record made by on_telemetry");
        let change = record.on_heartbeat(heartbeat, now_ms);
        let record = record.clone();
        self.store.put_agent(&record)?;
        self.notice_key_set_fork(&record, now_ms)?;
        if let Some(change) = change {
            self.presence_changed(&record, change, now_ms)?;
        }
        for id in self.rollouts_of(agent) {
            let actions = self.rollout_mut(&id).on_heartbeat(agent, heartbeat, now_ms);
            self.carry_out(&id, actions, now_ms)?;
        }
        Ok(())
    }

    fn on_event(&mut self, agent: &str, event: &Event, now_ms: u64) -> Result<()> {
        let record = self
            .agents
            .get_mut(agent)
            .expect("invariant: record made by on_telemetry");
        match &event.kind {
            EventKind::Started { active } => record.active = active.clone(),
            EventKind::KeySetApplied {
                version, digest, ..
            } => {
                record.key_set = *version;
                record.key_set_digest = *digest;
            }
            _ => {}
        }
        let record = record.clone();
        self.store.put_agent(&record)?;
        self.notice_key_set_fork(&record, now_ms)?;
        let (kind, message) = describe_event(agent, &event.kind);
        self.log(
            Some(agent),
            event.rollout.as_deref(),
            kind,
            message,
            serde_json::to_value(event).unwrap_or_default(),
            now_ms,
        )?;
        for id in self.rollouts_of(agent) {
            let actions = self.rollout_mut(&id).on_event(agent, event, now_ms);
            self.carry_out(&id, actions, now_ms)?;
        }
        Ok(())
    }

    // ---- time --------------------------------------------------------------------------

    /// Marks silent agents offline and lets every active rollout's timers run.
    pub fn tick(&mut self, now_ms: u64) -> Result<()> {
        let silent: Vec<String> = self
            .agents
            .values()
            .filter(|a| a.online && now_ms.saturating_sub(a.last_seen_ms) > self.agent_timeout_ms)
            .map(|a| a.id.clone())
            .collect();
        for agent in silent {
            let record = self
                .agents
                .get_mut(&agent)
                .expect("invariant: listed above");
            record.time_out(now_ms);
            let record = record.clone();
            self.store.put_agent(&record)?;
            tracing::info!(agent, "agent silent past the timeout; counted offline");
            self.presence_changed(&record, PresenceChange::WentOffline, now_ms)?;
        }
        let active: Vec<String> = self
            .rollouts
            .values()
            .filter(|r| r.is_active())
            .map(|r| r.id().to_owned())
            .collect();
        for id in active {
            self.pause_if_expired(&id, now_ms)?;
            let actions = self.rollout_mut(&id).tick(now_ms);
            self.carry_out(&id, actions, now_ms)?;
        }
        Ok(())
    }

    /// Why rollout `id` must not send its bundle on: it expired while agents it has not
    /// reached remain, which would refuse it. `None` while it may go on.
    fn expired_midway(&self, id: &str, now_ms: u64) -> Option<String> {
        let rollout = &self.rollouts[id];
        let unreached = rollout.agents().any(|(_, a)| a.assigned_ms.is_none());
        if !unreached || !self.expired(&rollout.bundle().digest, now_ms) {
            return None;
        }
        let record = &self.bundles[&rollout.bundle().digest];
        Some(format!(
            "{}, and agents it has not reached would refuse it: roll back, or abort and roll \
             out a newer release",
            expiry_of(record)
        ))
    }

    /// Pauses a rollout going forward once [`Hub::expired_midway`] says it must stop.
    fn pause_if_expired(&mut self, id: &str, now_ms: u64) -> Result<()> {
        if !matches!(self.rollouts[id].state(), RolloutState::Wave { .. }) {
            return Ok(());
        }
        let Some(reason) = self.expired_midway(id, now_ms) else {
            return Ok(());
        };
        let actions = self
            .rollout_mut(id)
            .pause(now_ms, reason)
            .map_err(|e| anyhow::anyhow!(e))?;
        self.carry_out(id, actions, now_ms)
    }

    /// Publishes every agent's desired state again (retained). Called after each connection
    /// to the broker: an embedded broker keeps no retained messages across restarts.
    pub fn republish_desired(&mut self) {
        let states: Vec<DesiredState> = self.desired.values().cloned().collect();
        for state in states {
            self.publish_desired(&state);
        }
    }

    // ---- bundles -----------------------------------------------------------------------

    /// A verifier for uploads: the trusted publishers and threshold, at `now_ms`. Uploads
    /// are verified with it outside the hub's lock, then handed to [`Hub::add_bundle`].
    pub fn upload_verifier(&self, now_ms: u64) -> Result<Verifier, HubError> {
        Ok(self.trusted_keys()?.verifier(now_ms / 1000))
    }

    fn trusted_keys(&self) -> Result<&TrustedKeys, HubError> {
        self.trust.as_ref().ok_or_else(|| {
            HubError::Conflict(
                "this server trusts no publisher key; add [trust] publishers to its config".into(),
            )
        })
    }

    // ---- key sets ----------------------------------------------------------------------

    /// The control-plane key agents on the newest key set require; what `GET /server/key`
    /// hands out for configuring new agents.
    pub fn control_plane_key(&self) -> PublicKey {
        let id = self
            .key_changes
            .last()
            .map_or(self.first_key, |(_, id)| *id);
        self.keys[&id].public()
    }

    /// The publisher keys trusted now, and every key set kept, oldest first.
    pub fn trust(&self) -> (Option<&TrustedKeys>, &[SignedKeySet]) {
        (self.trust.as_ref(), &self.key_sets)
    }

    /// Agents whose served bundle key set `keys` would not trust, as `agent (name@version)`,
    /// and active rollouts whose bundle, or whose rollback target for an agent it updated, it
    /// would not trust.
    fn untrusted_under(&self, keys: &TrustedKeys) -> (Vec<String>, Vec<String>) {
        let trusted = |digest: &Sha256Digest| self.trusted_by(keys, digest);
        let agents = self
            .agents
            .values()
            .filter(|a| a.active.as_ref().is_some_and(|m| !trusted(&m.digest)))
            .map(|a| format!("{} ({})", a.id, a.version_label()))
            .collect();
        // An active rollout ships its bundle, and may yet send its updated agents back to what
        // they ran before.
        let rollouts = self
            .rollouts
            .values()
            .filter(|r| r.is_active())
            .filter(|r| {
                !trusted(&r.bundle().digest)
                    || r.agents().any(|(_, a)| {
                        a.assigned_ms.is_some()
                            && a.previous.as_ref().is_some_and(|p| !trusted(&p.digest))
                    })
            })
            .map(|r| r.id().to_owned())
            .collect();
        (agents, rollouts)
    }

    /// The key set that would follow the trusted one, checked but not kept; what a caller
    /// needs to look for new signers with [`SignerScan::run`] before [`Hub::add_key_set`].
    pub fn check_key_set(&self, signed: &SignedKeySet) -> Result<Accepted, HubError> {
        self.trusted_keys()?.next(signed).map_err(|e| match e {
            KeySetError::NotNewer { .. } | KeySetError::Skips { .. } => {
                HubError::Conflict(e.to_string())
            }
            other => HubError::Invalid(format!("key set refused: {other}")),
        })
    }

    /// Each held bundle with the publisher keys of `keys` not counted among its signers.
    pub fn unlearned_signers(&self, keys: &TrustedKeys) -> Vec<(Sha256Digest, Vec<PublicKey>)> {
        self.bundles
            .values()
            .filter_map(|record| {
                let known = signers_of(record);
                let new: Vec<PublicKey> = keys
                    .publishers()
                    .iter()
                    .filter(|k| !known.contains(&k.id()))
                    .copied()
                    .collect();
                (!new.is_empty()).then_some((record.digest, new))
            })
            .collect()
    }

    /// Adds to each held bundle's `signed_by` the keys of `keys` whose signatures on it verify
    /// but were not counted at upload (signed by a key not trusted then), so a bundle signed
    /// by the old and the new keys before a rotation counts as signed by the new ones. Uses
    /// what `scan` found, and reads only bundles it did not look at (uploaded since).
    fn learn_signers(&mut self, keys: &TrustedKeys, scan: SignerScan) -> Result<(), HubError> {
        let mut missed = Vec::new();
        for (digest, new) in self.unlearned_signers(keys) {
            let (seen, unseen): (Vec<PublicKey>, Vec<PublicKey>) = new
                .into_iter()
                .partition(|key| scan.verdicts.contains_key(&(digest, key.id())));
            if !unseen.is_empty() {
                missed.push((digest, unseen));
            }
            let found: Vec<KeyId> = seen
                .iter()
                .map(PublicKey::id)
                .filter(|id| scan.verdicts[&(digest, *id)])
                .collect();
            self.add_signers(&digest, &found)?;
        }
        let late = SignerScan::run(&self.store, missed)?;
        for ((digest, id), signed) in late.verdicts {
            if signed {
                self.add_signers(&digest, &[id])?;
            }
        }
        Ok(())
    }

    fn add_signers(&mut self, digest: &Sha256Digest, ids: &[KeyId]) -> Result<(), HubError> {
        if ids.is_empty() {
            return Ok(());
        }
        let record = self
            .bundles
            .get_mut(digest)
            .expect("invariant: called for held digests");
        record.signed_by.extend(ids.iter().map(|id| id.0.to_hex()));
        let record = record.clone();
        self.store.put_bundle_record(&record)?;
        Ok(())
    }

    /// Whether the bundle `digest` has expired by `now_ms` (agents would refuse it as new); a
    /// bundle the server does not hold cannot be judged and counts as unexpired.
    fn expired(&self, digest: &Sha256Digest, now_ms: u64) -> bool {
        self.bundles
            .get(digest)
            .is_some_and(|b| now_ms / 1000 > b.expires_at)
    }

    /// Whether `keys` trust the bundle `digest`; a bundle the server does not hold cannot be
    /// judged and counts as trusted.
    fn trusted_by(&self, keys: &TrustedKeys, digest: &Sha256Digest) -> bool {
        self.bundles
            .get(digest)
            .is_none_or(|b| keys.accepts_signers(&signers_of(b)))
    }

    /// Accepts the key set that follows the trusted one, keeps it, and publishes the chain to
    /// agents. Refused (409) when agents serve, or an active rollout ships, bundles the new keys
    /// do not trust, unless `force`: such agents keep serving but could neither restore their
    /// bundle after a restart nor be rolled back to it.
    pub fn add_key_set(
        &mut self,
        signed: SignedKeySet,
        scan: SignerScan,
        force: bool,
        now_ms: u64,
    ) -> Result<Accepted, HubError> {
        let accepted = self.check_key_set(&signed)?;
        let chain_bytes: usize = self
            .key_sets
            .iter()
            .chain(std::iter::once(&accepted.signed))
            .map(|s| s.encode().len())
            .sum();
        if chain_bytes > flotilla_shared::keyset::MAX_CHAIN_BYTES {
            return Err(HubError::Conflict(format!(
                "the chain of key sets would be {chain_bytes} bytes, over the {} that every desired state can carry",
                flotilla_shared::keyset::MAX_CHAIN_BYTES
            )));
        }
        self.learn_signers(&accepted.keys, scan)?;
        let (agents, rollouts) = self.untrusted_under(&accepted.keys);
        let stranding = !agents.is_empty() || !rollouts.is_empty();
        if stranding && !force {
            let mut problems = Vec::new();
            if !agents.is_empty() {
                problems.push(format!(
                    "{} agent(s) serve bundles its keys did not sign: {}; they would keep serving them but could not load them again after a restart",
                    agents.len(),
                    agents.join(", ")
                ));
            }
            if !rollouts.is_empty() {
                problems.push(format!(
                    "active rollout(s) {} ship, or would roll back to, bundles its keys did not sign, which agents would refuse",
                    rollouts.join(", ")
                ));
            }
            return Err(HubError::Conflict(format!(
                "key set {}: {}. Roll the fleet onto bundles the new keys signed first, or force it",
                accepted.keys.version(),
                problems.join("; ")
            )));
        }
        let version = accepted.keys.version();
        let new_key = match accepted.set.control_plane {
            Some(public) if !self.keys.contains_key(&public.id()) => {
                let key = load_next_key(&self.key_dir, &public).map_err(|e| {
                    HubError::Conflict(format!(
                        "key set {version} names control-plane key {}, which this server cannot sign with: {e:#}. \
                         Make the key with `flotilla server new-key` on the server's data directory and name the .pub it writes",
                        public.id()
                    ))
                })?;
                Some(key)
            }
            _ => None,
        };
        self.store.put_key_set(version, &accepted.signed)?;
        if let Some(key) = new_key {
            self.keys.insert(key.public().id(), key);
        }
        if let Some(public) = accepted.set.control_plane {
            // Agents still on an older set keep getting states signed with the key they
            // trust; each moves to this one as it reports the new set.
            self.key_changes.push((version, public.id()));
        }
        self.key_sets.push(accepted.signed.clone());
        self.trust = Some(accepted.keys.clone());
        let ids: Vec<String> = accepted
            .keys
            .publishers()
            .iter()
            .map(|k| k.id().to_string())
            .collect();
        self.log(
            None,
            None,
            "key_set_added",
            format!(
                "key set {version} trusted: {} publisher key(s) ({}), threshold {}{}",
                ids.len(),
                ids.join(", "),
                accepted.keys.threshold(),
                if agents.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; forced past {} agent(s) serving bundles it does not trust",
                        agents.len()
                    )
                }
            ),
            serde_json::json!({
                "version": version,
                "publishers": ids,
                "threshold": accepted.keys.threshold(),
                "reset_floors": accepted.set.reset_floors,
                "untrusted_agents": agents,
                "untrusted_rollouts": rollouts,
            }),
            now_ms,
        )?;
        // Durable before any agent hears of it: a server that came back without the set
        // would hand out a shorter chain than agents already follow.
        self.store.flush_blocking()?;
        self.republish_desired();
        Ok(accepted)
    }

    /// Stores a bundle that passed [`Hub::upload_verifier`]'s checks. Returns the record and
    /// whether it is new; a second release with the same name and version but other
    /// contents is refused.
    pub fn add_bundle(
        &mut self,
        verified: VerifiedBundle,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<(BundleRecord, bool), HubError> {
        if let Some(existing) = self.bundles.get(&verified.digest) {
            return Ok((existing.clone(), false));
        }
        // Verified outside the lock: a key set may have been added meanwhile.
        if !self.trusted_keys()?.accepts_signers(&verified.signed_by) {
            return Err(HubError::Conflict(
                "the trusted publisher keys changed while the bundle was checked; upload it again"
                    .into(),
            ));
        }
        let manifest = &verified.manifest;
        let clash = self
            .bundles
            .values()
            .find(|b| b.name == manifest.name && b.version == manifest.version.to_string());
        if let Some(clash) = clash {
            return Err(HubError::Conflict(format!(
                "{}@{} is already held as {}; a release's contents never change, so bump the version",
                clash.name, clash.version, clash.digest
            )));
        }
        let record = BundleRecord {
            digest: verified.digest,
            name: manifest.name.clone(),
            version: manifest.version.to_string(),
            sequence: manifest.sequence,
            size: bytes.len() as u64,
            chunks: manifest.chunks.len() as u32,
            task: manifest.model.task.to_string(),
            backends: manifest
                .requirements
                .backends
                .iter()
                .map(|b| b.to_string())
                .collect(),
            expires_at: manifest.expires_at,
            signed_by: verified.signed_by.iter().map(|k| k.0.to_hex()).collect(),
            uploaded_ms: now_ms,
        };
        self.store.put_bundle(&record, bytes)?;
        self.bundles.insert(record.digest, record.clone());
        self.log(
            None,
            None,
            "bundle_uploaded",
            format!(
                "{}@{} uploaded ({})",
                record.name, record.version, record.digest
            ),
            serde_json::to_value(&record).unwrap_or_default(),
            now_ms,
        )?;
        Ok((record, true))
    }

    /// Every bundle, newest first.
    pub fn bundles(&self) -> Vec<BundleRecord> {
        let mut all: Vec<BundleRecord> = self.bundles.values().cloned().collect();
        all.sort_by(|a, b| b.uploaded_ms.cmp(&a.uploaded_ms).then(a.name.cmp(&b.name)));
        all
    }

    /// One bundle, by digest or `name@version`.
    pub fn bundle(&self, reference: &str) -> Result<BundleRecord, HubError> {
        let parsed: BundleRef = reference
            .parse()
            .map_err(|e| HubError::Invalid(format!("bundle reference {reference:?}: {e}")))?;
        self.resolve(&parsed)
    }

    fn resolve(&self, reference: &BundleRef) -> Result<BundleRecord, HubError> {
        self.bundles
            .values()
            .find(|b| reference.names(&b.digest, &b.name, &b.version))
            .cloned()
            .ok_or_else(|| HubError::NotFound(format!("unknown bundle {reference}")))
    }

    // ---- agents ------------------------------------------------------------------------

    /// Agents `keep` accepts, in id order, starting after the id `after` (from the first when
    /// `None`): one page of the fleet, borrowed.
    pub fn agents_after<'a>(
        &'a self,
        after: Option<&str>,
        keep: impl Fn(&AgentRecord) -> bool + 'a,
    ) -> impl Iterator<Item = &'a AgentRecord> + 'a {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, |id| Bound::Excluded(id.to_owned()));
        self.agents
            .range((from, Bound::Unbounded))
            .map(|(_, a)| a)
            .filter(move |a| keep(a))
    }

    /// Every agent, by id, borrowed: for counting under the lock without copying records.
    pub fn all_agents(&self) -> impl Iterator<Item = &AgentRecord> {
        self.agents.values()
    }

    /// One agent.
    pub fn agent(&self, id: &str) -> Result<AgentRecord, HubError> {
        self.agents
            .get(id)
            .cloned()
            .ok_or_else(|| HubError::NotFound(format!("unknown agent {id:?}")))
    }

    /// The desired state last issued to an agent.
    pub fn desired_of(&self, id: &str) -> Option<&DesiredState> {
        self.desired.get(id)
    }

    /// Forgets an agent that is offline and in no active rollout, and any birth of it
    /// waiting for acceptance; or withdraws the key approved ahead for an agent not seen.
    pub fn forget_agent(&mut self, id: &str, now_ms: u64) -> Result<(), HubError> {
        let registered = self.agents.contains_key(id);
        if !registered && !self.pending.contains_key(id) && !self.approvals.contains_key(id) {
            return Err(HubError::NotFound(format!("unknown agent {id:?}")));
        }
        if registered {
            self.check_forgettable(id)?;
            self.remove_agent(id)?;
        }
        self.pending.remove(id);
        self.withdraw_approval(id)?;
        self.log(
            Some(id),
            None,
            "agent_forgotten",
            format!("{id} forgotten"),
            serde_json::Value::Null,
            now_ms,
        )?;
        Ok(())
    }

    /// Drops everything kept about an agent, and clears its retained desired state on the
    /// broker (an empty retained message), so a device that takes the id later is not sent
    /// what its predecessor was told.
    fn remove_agent(&mut self, id: &str) -> Result<()> {
        self.store.remove_agent(id)?;
        self.agents.remove(id);
        if self.desired.remove(id).is_some() {
            let _ = self.out.send(Outgoing {
                topic: topics::agent_desired(id),
                payload: Vec::new(),
                retain: true,
            });
        }
        self.expired_notices.remove(id);
        self.fork_notices.remove(id);
        Ok(())
    }

    fn check_forgettable(&self, id: &str) -> Result<(), HubError> {
        let record = self.agent(id)?;
        if record.online {
            return Err(HubError::Conflict(format!(
                "agent {id} is online; stop it first"
            )));
        }
        if let Some(rollout) = self.rollouts_of(id).first() {
            return Err(HubError::Conflict(format!(
                "agent {id} is in active rollout {rollout}"
            )));
        }
        Ok(())
    }

    // ---- rollouts ----------------------------------------------------------------------

    /// Plans and starts a rollout. `id` defaults to `name-version-N`.
    pub fn create_rollout(
        &mut self,
        id: Option<String>,
        spec: RolloutSpec,
        now_ms: u64,
    ) -> Result<&Rollout, HubError> {
        spec.validate()
            .map_err(|e| HubError::Invalid(format!("invalid rollout spec: {e}")))?;
        let bundle = self.resolve(&spec.bundle).map_err(|e| match e {
            HubError::NotFound(m) => HubError::Invalid(format!("{m}; upload it first")),
            other => other,
        })?;
        if let Some(keys) = self.trust.as_ref() {
            if !keys.accepts_signers(&signers_of(&bundle)) {
                return Err(HubError::Invalid(format!(
                    "{}@{} is not signed by the publisher keys trusted now (key set {}): agents would refuse it",
                    bundle.name,
                    bundle.version,
                    keys.version()
                )));
            }
        }
        if self.expired(&bundle.digest, now_ms) {
            return Err(HubError::Invalid(format!(
                "{}: agents would refuse it; pack and push a newer release",
                expiry_of(&bundle)
            )));
        }
        let id = match id {
            Some(id) => {
                if self.rollouts.contains_key(&id) {
                    return Err(HubError::Conflict(format!("rollout {id} already exists")));
                }
                id
            }
            None => (1..)
                .map(|n| format!("{}-{}-{n}", bundle.name, bundle.version))
                .find(|id| !self.rollouts.contains_key(id))
                .expect("invariant: an unused id exists"),
        };
        let fleet: Vec<Target> = self
            .agents
            .values()
            .map(|a| Target {
                agent: a.id.clone(),
                labels: a.labels.clone(),
                online: a.online,
                running: a.running(),
            })
            .collect();
        let desired = DesiredBundle {
            digest: bundle.digest,
            name: bundle.name.clone(),
            version: bundle.version.clone(),
        };
        let mut rollout = Rollout::new(id.clone(), spec, desired, &fleet, now_ms)
            .map_err(|e| HubError::Invalid(e.to_string()))?;
        check_overlap(self.rollouts.values(), rollout.targets())
            .map_err(|e| HubError::Invalid(e.to_string()))?;
        let actions = rollout
            .start(now_ms)
            .map_err(|e| HubError::Internal(anyhow::anyhow!(e)))?;
        self.rollouts.insert(id.clone(), rollout);
        self.carry_out(&id, actions, now_ms)?;
        Ok(&self.rollouts[&id])
    }

    /// Every rollout, newest first.
    pub fn rollouts(&self) -> Vec<&Rollout> {
        let mut all: Vec<&Rollout> = self.rollouts.values().collect();
        all.sort_by(|a, b| b.created_ms().cmp(&a.created_ms()).then(a.id().cmp(b.id())));
        all
    }

    /// One rollout.
    pub fn rollout(&self, id: &str) -> Result<&Rollout, HubError> {
        self.rollouts
            .get(id)
            .ok_or_else(|| HubError::NotFound(format!("unknown rollout {id:?}")))
    }

    /// Pauses, resumes, aborts or rolls back a rollout by hand.
    pub fn steer(
        &mut self,
        id: &str,
        steer: Steer,
        reason: Option<String>,
        now_ms: u64,
    ) -> Result<&Rollout, HubError> {
        if !self.rollouts.contains_key(id) {
            return Err(HubError::NotFound(format!("unknown rollout {id:?}")));
        }
        let reason = reason.unwrap_or_else(|| "operator request".into());
        if steer == Steer::Resume {
            if let Some(why) = self.expired_midway(id, now_ms) {
                return Err(HubError::Conflict(format!(
                    "rollout {id} cannot resume: {why}"
                )));
            }
        }
        let rollout = self.rollout_mut(id);
        let result: Result<Vec<Action>, RolloutError> = match steer {
            Steer::Pause => rollout.pause(now_ms, reason),
            Steer::Resume => rollout.resume(now_ms),
            Steer::Abort => rollout.abort(now_ms, reason),
            Steer::Rollback => rollout.rollback(now_ms, reason),
        };
        let actions = result.map_err(|e| HubError::Conflict(e.to_string()))?;
        self.carry_out(id, actions, now_ms)?;
        Ok(&self.rollouts[id])
    }

    /// The active rollout that holds `agent`, if one does (active rollouts never share an
    /// agent).
    pub fn active_rollout_of(&self, agent: &str) -> Option<&str> {
        self.rollouts
            .values()
            .find(|r| r.is_active() && r.agent(agent).is_some())
            .map(Rollout::id)
    }

    fn rollouts_of(&self, agent: &str) -> Vec<String> {
        self.rollouts
            .values()
            .filter(|r| r.is_active() && r.agent(agent).is_some())
            .map(|r| r.id().to_owned())
            .collect()
    }

    fn rollout_mut(&mut self, id: &str) -> &mut Rollout {
        self.rollouts
            .get_mut(id)
            .expect("invariant: callers pass ids of held rollouts")
    }

    /// Carries out what a rollout asked for, then persists the rollout.
    fn carry_out(&mut self, id: &str, actions: Vec<Action>, now_ms: u64) -> Result<()> {
        for action in actions {
            match action {
                Action::SetDesired { agent, bundle } => {
                    self.set_desired(&agent, bundle, Some(id), now_ms)?;
                }
                Action::Log(event) => self.log_rollout_event(id, &event, now_ms)?,
            }
        }
        self.store.put_rollout(&self.rollouts[id])?;
        if !self.rollouts[id].is_active() {
            // It just finished: agents that joined while it ran, or were waiting for a first
            // release, move to what it left.
            self.assign_newcomers(None, now_ms)?;
        }
        Ok(())
    }

    fn log_rollout_event(&mut self, id: &str, event: &RolloutEvent, now_ms: u64) -> Result<()> {
        let detail = serde_json::to_value(event).unwrap_or_default();
        let kind = detail
            .get("event")
            .and_then(|v| v.as_str())
            .map(|k| format!("rollout_{k}"))
            .unwrap_or_else(|| "rollout_gate_failed".into());
        let message = describe_rollout_event(id, event);
        tracing::info!(rollout = id, "{message}");
        let agent = match event {
            RolloutEvent::AgentReturned { agent, .. } | RolloutEvent::AgentFailed { agent, .. } => {
                Some(agent.as_str())
            }
            _ => None,
        };
        self.log(agent, Some(id), &kind, message, detail, now_ms)
    }

    // ---- desired state -----------------------------------------------------------------

    /// Issues the next desired state for `agent`, signed and retained. Generations rise by one
    /// and are at least the time in milliseconds, so they keep rising where the server's
    /// count started again: an agent forgotten and back with its store, or a server restored
    /// from an older backup, would otherwise ignore every state as already applied.
    fn set_desired(
        &mut self,
        agent: &str,
        bundle: Option<DesiredBundle>,
        rollout: Option<&str>,
        now_ms: u64,
    ) -> Result<()> {
        let next = self.desired.get(agent).map_or(1, |d| d.generation + 1);
        let generation = next.max(now_ms);
        let state = DesiredState {
            agent: agent.to_owned(),
            generation,
            bundle,
            rollout: rollout.map(str::to_owned),
            issued_at_ms: now_ms,
            key_sets: Vec::new(),
        };
        self.store.put_desired(&state)?;
        self.publish_desired(&state);
        self.desired.insert(agent.to_owned(), state);
        Ok(())
    }

    /// Signs and publishes (retained) an agent's desired state with the chain of key sets
    /// inside, signed by the newest control-plane key and every earlier one, so an agent on
    /// any key set can check it (and then follow the chain to the newest).
    fn publish_desired(&mut self, state: &DesiredState) {
        let state = DesiredState {
            key_sets: self.key_sets.clone(),
            ..state.clone()
        };
        let newest = self.control_plane_key().id();
        let mut earlier: Vec<KeyId> = std::iter::once(self.first_key)
            .chain(self.key_changes.iter().map(|(_, id)| *id))
            .filter(|id| *id != newest)
            .collect();
        earlier.dedup();
        let earlier: Vec<&SecretKey> = earlier.iter().map(|id| &self.keys[id]).collect();
        let signed = SignedDesiredState::sign_all(&state, &self.keys[&newest], &earlier);
        self.seq += 1;
        let envelope = Envelope::new(SERVER_ID, self.seq, state.issued_at_ms, signed);
        let _ = self.out.send(Outgoing {
            topic: topics::agent_desired(&state.agent),
            payload: envelope.encode(),
            retain: true,
        });
    }

    // ---- events ------------------------------------------------------------------------

    fn log(
        &mut self,
        agent: Option<&str>,
        rollout: Option<&str>,
        kind: &str,
        message: String,
        detail: serde_json::Value,
        now_ms: u64,
    ) -> Result<()> {
        self.store
            .append_event(EventRecord {
                id: 0,
                at_ms: now_ms,
                agent: agent.map(str::to_owned),
                rollout: rollout.map(str::to_owned),
                kind: kind.to_owned(),
                message,
                detail,
            })
            .context("cannot append to the event log")?;
        Ok(())
    }
}

enum Drop {
    Foreign,
    Malformed(String),
    Unauthenticated(String),
}

/// The configured publisher keys, moved on by the key sets the store kept. A kept set that no
/// longer follows them (the configuration names other keys) stops the server: agents follow
/// the same chain, so the two must agree.
fn load_trust(store: &Store, settings: &HubSettings) -> Result<Option<TrustedKeys>> {
    let kept = store.key_sets()?;
    if settings.publishers.is_empty() {
        if !kept.is_empty() {
            anyhow::bail!(
                "the data directory holds {} key set(s) but the config trusts no publisher key to check them against",
                kept.len()
            );
        }
        return Ok(None);
    }
    let configured = TrustedKeys::new(
        settings.key_set,
        settings.publishers.clone(),
        settings.threshold,
    )
    .context("trust configuration")?;
    let followed = configured.follow(&kept);
    if let Some(e) = followed.refused {
        anyhow::bail!(
            "a key set kept in the data directory does not follow the configured trust keys \
             (trust.publishers, trust.threshold, trust.key_set): {e}"
        );
    }
    Ok(Some(
        followed
            .accepted
            .last()
            .map_or(configured, |a| a.keys.clone()),
    ))
}

/// The secret half of a control-plane key a key set names, from `DIR/control-plane-ID.key`.
fn load_next_key(dir: &std::path::Path, public: &PublicKey) -> Result<SecretKey> {
    let path = super::next_key_path(dir, &public.id());
    let key = crate::keyfile::load_secret(&path)?;
    if key.public() != *public {
        anyhow::bail!("{} holds another key", path.display());
    }
    Ok(key)
}

/// The key ids that signed a bundle, as its record keeps them.
/// "NAME@VERSION expired at TIME".
fn expiry_of(bundle: &BundleRecord) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(bundle.expires_at);
    format!(
        "{}@{} expired at {}",
        bundle.name,
        bundle.version,
        humantime::format_rfc3339_seconds(at)
    )
}

fn signers_of(bundle: &BundleRecord) -> Vec<flotilla_shared::KeyId> {
    bundle
        .signed_by
        .iter()
        .filter_map(|hex| hex.parse::<Sha256Digest>().ok().map(flotilla_shared::KeyId))
        .collect()
}

/// Which publisher keys signed which held bundles, as read from the bundles' headers. Taken
/// with [`SignerScan::run`] off the hub's lock, since it reads every bundle named, and handed
/// to [`Hub::add_key_set`].
#[derive(Debug, Default)]
pub struct SignerScan {
    /// (bundle, key) → whether a signature by the key on the bundle's manifest verifies.
    verdicts: BTreeMap<(Sha256Digest, KeyId), bool>,
}

impl SignerScan {
    /// Checks, for each bundle named, whether each of its keys signed it. A bundle no longer
    /// in the store is skipped.
    pub fn run(store: &Store, candidates: Vec<(Sha256Digest, Vec<PublicKey>)>) -> Result<Self> {
        let mut verdicts = BTreeMap::new();
        for (digest, keys) in candidates {
            let Some(bytes) = store.bundle_payload(&digest)? else {
                continue;
            };
            let (manifest, signatures, _) = flotilla_shared::Bundle::parse_header(&bytes)
                .with_context(|| format!("held bundle {digest} does not parse"))?;
            for key in keys {
                let signed = signatures.iter().any(|s| {
                    s.key_id == key.id() && key.verify_strict_bytes(manifest, &s.signature)
                });
                verdicts.insert((digest, key.id()), signed);
            }
        }
        Ok(Self { verdicts })
    }
}

/// A short name and a sentence for an agent event.
fn describe_event(agent: &str, kind: &EventKind) -> (&'static str, String) {
    match kind {
        EventKind::Downloading { received, total } => (
            "downloading",
            format!("{agent} downloading: {received}/{total} chunks"),
        ),
        EventKind::Verifying => ("verifying", format!("{agent} verifying the bundle")),
        EventKind::Staged => ("staged", format!("{agent} staged the bundle")),
        EventKind::SelfTestPassed => ("self_test_passed", format!("{agent} passed the self-test")),
        EventKind::SelfTestFailed { reason } => (
            "self_test_failed",
            format!("{agent} failed the self-test: {reason}"),
        ),
        EventKind::Active { name, version } => {
            ("active", format!("{agent} now serves {name}@{version}"))
        }
        EventKind::InstallFailed { stage, reason } => (
            "install_failed",
            format!("{agent} install failed at {stage}: {reason}"),
        ),
        EventKind::DesiredStateRejected { reason } => (
            "desired_state_rejected",
            format!("{agent} rejected its desired state: {reason}"),
        ),
        EventKind::Degraded { cause } => ("degraded", format!("{agent} degraded: {cause}")),
        EventKind::KeySetApplied {
            version,
            publishers,
            threshold,
            active_trusted,
            ..
        } => (
            "key_set_applied",
            format!(
                "{agent} now trusts key set {version} ({} key(s), threshold {threshold}){}",
                publishers.len(),
                if *active_trusted {
                    ""
                } else {
                    "; the bundle it serves is not signed by them"
                }
            ),
        ),
        EventKind::KeySetRejected { reason } => (
            "key_set_rejected",
            format!("{agent} did not apply a key set: {reason}"),
        ),
        EventKind::Started { active } => (
            "started",
            match active {
                Some(a) => format!("{agent} started serving {}@{}", a.name, a.version),
                None => format!("{agent} started with no model"),
            },
        ),
    }
}

/// A sentence for a rollout event.
pub fn describe_rollout_event(id: &str, event: &RolloutEvent) -> String {
    match event {
        RolloutEvent::Started { targets, waves, .. } => {
            format!("rollout {id} started: {targets} agents in {waves} waves")
        }
        RolloutEvent::WaveStarted {
            wave,
            assigned,
            unreachable,
            ..
        } => format!(
            "rollout {id} wave {wave} started: {assigned} agents sent the new version, {unreachable} unreachable"
        ),
        RolloutEvent::AgentReturned { agent, wave, .. } => {
            format!("rollout {id}: {agent} returned and joins wave {wave}")
        }
        RolloutEvent::AgentFailed {
            agent,
            wave,
            stage,
            reason,
            ..
        } => format!("rollout {id} wave {wave}: {agent} failed at {stage}: {reason}"),
        RolloutEvent::BakeStarted { wave, until_ms, .. } => {
            format!("rollout {id} wave {wave} baking until {until_ms}")
        }
        RolloutEvent::GatesEvaluated { wave, passed, gates, .. } => format!(
            "rollout {id} wave {wave} gates {}: {}",
            if *passed { "passed" } else { "failed" },
            gates
                .iter()
                .map(|g| format!(
                    "{} {} (limit {}){}",
                    g.gate.as_str(),
                    g.value.map_or("-".into(), |v| format!("{v:.3}")),
                    g.threshold,
                    if g.passed { "" } else { " FAILED" }
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        RolloutEvent::WavePassed { wave, .. } => format!("rollout {id} wave {wave} passed"),
        RolloutEvent::GateFailed(f) => format!(
            "rollout {id} wave {} failed gate {}: {} against limit {} (over {})",
            f.wave,
            f.gate.as_str(),
            f.value.map_or("-".into(), |v| format!("{v:.3}")),
            f.threshold,
            f.gate.basis_text(f.basis)
        ),
        RolloutEvent::Paused { wave, reason, .. } => {
            format!("rollout {id} paused in wave {wave}: {reason}")
        }
        RolloutEvent::Resumed {
            wave, overridden, ..
        } => format!(
            "rollout {id} resumed in wave {wave}{}",
            if *overridden { " past a failed gate" } else { "" }
        ),
        RolloutEvent::Completed { stragglers, .. } => {
            format!("rollout {id} completed ({stragglers} offline agents will update on return)")
        }
        RolloutEvent::Aborted { reason, .. } => format!("rollout {id} aborted: {reason}"),
        RolloutEvent::RollbackStarted { agents, .. } => {
            format!("rollout {id} rolling back {agents} agents")
        }
        RolloutEvent::RolledBack {
            confirmed,
            stragglers,
            ..
        } => format!(
            "rollout {id} rolled back: {confirmed} confirmed, {} did not confirm",
            stragglers.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use flotilla_shared::{Bundle, KeySet};

    use super::*;

    const NOW_MS: u64 = 1_800_000_000_000;

    fn hub(dir: &std::path::Path, publisher: &SecretKey) -> Hub {
        let settings = HubSettings {
            key: SecretKey::from_seed([9; 32]),
            publishers: vec![publisher.public()],
            threshold: 1,
            key_set: 1,
            key_dir: dir.to_owned(),
            agent_timeout_ms: 10_000,
            assign_new_agents: true,
            admission: Admission::Open,
        };
        let (out, _) = mpsc::unbounded_channel();
        Hub::load(Store::open(dir).unwrap(), settings, out, NOW_MS).unwrap()
    }

    /// The test model packed and signed by `signers`.
    fn bundle(signers: &[&SecretKey]) -> Vec<u8> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-bert-embed");
        let packed = crate::pack::pack(&dir, NOW_MS / 1000, &()).unwrap();
        let mut bundle = Bundle::parse(&packed.bytes).unwrap();
        for key in signers {
            bundle.add_signature(key);
        }
        bundle.to_bytes()
    }

    fn next_set(publisher: &SecretKey, signers: &[&SecretKey]) -> SignedKeySet {
        let mut signed = SignedKeySet::new(&KeySet::new(2, vec![publisher.public()], 1, 0));
        for key in signers {
            signed.add_signature(key);
        }
        signed
    }

    /// A hub trusting `trusted` that holds the test model signed by `signers`, uploaded at
    /// `NOW_MS`; with its directory, the bundle's digest and when it expires.
    fn hub_holding(
        trusted: &SecretKey,
        signers: &[&SecretKey],
    ) -> (tempfile::TempDir, Hub, Sha256Digest, u64) {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = hub(dir.path(), trusted);
        let bytes = bundle(signers);
        let verified = hub.upload_verifier(NOW_MS).unwrap().verify(&bytes).unwrap();
        let (digest, expires_at) = (verified.digest, verified.manifest.expires_at);
        hub.add_bundle(verified, &bytes, NOW_MS).unwrap();
        (dir, hub, digest, expires_at)
    }

    fn signers(hub: &Hub, digest: &Sha256Digest) -> Vec<KeyId> {
        signers_of(&hub.bundles[digest])
    }

    /// The birth `agent` publishes in `session`, naming and signed by `key`.
    fn signed_birth(agent: &str, session: u64, key: &SecretKey) -> (String, Vec<u8>) {
        let birth = crate::server::registry::test_birth(session, key.public());
        signed_presence(agent, Presence::Online(birth), key)
    }

    /// `presence` on `agent`'s state topic, signed by `key`.
    fn signed_presence(agent: &str, presence: Presence, key: &SecretKey) -> (String, Vec<u8>) {
        let topic = topics::agent_state(agent);
        let envelope = Envelope::new(agent, 0, 0, presence).encode();
        let payload = SignedReport::seal(&topic, envelope, key);
        (topic, payload)
    }

    fn events_about(hub: &Hub, agent: &str, kind: &str) -> usize {
        let about = |e: &EventRecord| e.agent.as_deref() == Some(agent) && e.kind == kind;
        hub.store().events(0, 1000, about).unwrap().len()
    }

    #[test]
    fn a_replayed_birth_does_not_bring_back_an_agent_whose_will_arrived() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = hub(dir.path(), &SecretKey::from_seed([1; 32]));
        let key = SecretKey::from_seed([30; 32]);
        let birth = signed_birth("edge-1", 7, &key);
        let will = signed_presence("edge-1", Presence::Offline { session: 7 }, &key);

        hub.on_agent_message(&birth.0, &birth.1, NOW_MS);
        hub.on_agent_message(&will.0, &will.1, NOW_MS + 1);
        for at in 2..6 {
            hub.on_agent_message(&birth.0, &birth.1, NOW_MS + at);
            hub.on_agent_message(&will.0, &will.1, NOW_MS + at);
        }

        assert!(!hub.agent("edge-1").unwrap().online);
        assert_eq!(events_about(&hub, "edge-1", "agent_online"), 1);
        assert_eq!(events_about(&hub, "edge-1", "agent_offline"), 1);
        let next = signed_birth("edge-1", 8, &key);
        hub.on_agent_message(&next.0, &next.1, NOW_MS + 10);
        assert!(
            hub.agent("edge-1").unwrap().online,
            "a new session is heard"
        );
    }

    #[test]
    fn an_agent_accepted_after_its_will_arrived_is_registered_offline() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = hub(dir.path(), &SecretKey::from_seed([1; 32]));
        hub.admission = Admission::Accept;
        let key = SecretKey::from_seed([37; 32]);
        let (topic, payload) = signed_birth("edge-w", 3, &key);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        let forged = signed_presence(
            "edge-w",
            Presence::Offline { session: 3 },
            &SecretKey::from_seed([38; 32]),
        );
        hub.on_agent_message(&forged.0, &forged.1, NOW_MS);
        let record = hub
            .accept_agent("edge-w", &key.public().id(), NOW_MS)
            .unwrap();
        assert!(
            record.online,
            "a will another key signed is not the agent's"
        );

        let (topic, payload) = signed_birth("edge-x", 3, &key);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        let will = signed_presence("edge-x", Presence::Offline { session: 3 }, &key);
        hub.on_agent_message(&will.0, &will.1, NOW_MS + 1);
        let record = hub
            .accept_agent("edge-x", &key.public().id(), NOW_MS + 2)
            .unwrap();
        assert!(!record.online);
        assert_eq!(record.identity, Some(key.public()));
    }

    #[test]
    fn a_new_key_for_an_agent_still_online_is_not_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = hub(dir.path(), &SecretKey::from_seed([1; 32]));
        let (device, other) = (
            SecretKey::from_seed([39; 32]),
            SecretKey::from_seed([40; 32]),
        );
        let (topic, payload) = signed_birth("edge-o", 1, &device);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        let (topic, payload) = signed_birth("edge-o", 2, &other);
        hub.on_agent_message(&topic, &payload, NOW_MS);

        let accepted = hub.approve_agent("edge-o", &other.public().id(), NOW_MS);
        assert!(
            matches!(accepted, Err(HubError::Conflict(_))),
            "{accepted:?}"
        );
        assert_eq!(hub.agent("edge-o").unwrap().identity, Some(device.public()));
        assert_eq!(hub.pending_count(), 1, "it still waits");
    }

    #[test]
    fn a_replacement_device_approved_ahead_takes_the_id_over_once_the_old_one_is_offline() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = hub(dir.path(), &SecretKey::from_seed([1; 32]));
        hub.admission = Admission::Accept;
        let (old, new) = (
            SecretKey::from_seed([42; 32]),
            SecretKey::from_seed([43; 32]),
        );
        hub.approve_agent("edge-z", &old.public().id(), NOW_MS)
            .unwrap();
        let (topic, payload) = signed_birth("edge-z", 1, &old);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert!(matches!(
            hub.approve_agent("edge-z", &old.public().id(), NOW_MS),
            Err(HubError::Conflict(_))
        ));

        let approval = hub.approve_agent("edge-z", &new.public().id(), NOW_MS);
        assert!(matches!(approval, Ok(Approval::Ahead)), "{approval:?}");
        // While the old device is online, the new one waits.
        let (topic, payload) = signed_birth("edge-z", 1, &new);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert_eq!(hub.agent("edge-z").unwrap().identity, Some(old.public()));
        assert_eq!(hub.pending_count(), 1);

        let will = signed_presence("edge-z", Presence::Offline { session: 1 }, &old);
        hub.on_agent_message(&will.0, &will.1, NOW_MS + 1);
        let (topic, payload) = signed_birth("edge-z", 2, &new);
        hub.on_agent_message(&topic, &payload, NOW_MS + 2);
        let record = hub.agent("edge-z").unwrap();
        assert_eq!(record.identity, Some(new.public()));
        assert!(record.online);
        assert_eq!(hub.pending_count(), 0);
        assert!(hub.approvals().is_empty(), "the approval is used up");
        let (topic, payload) = signed_birth("edge-z", 9, &old);
        hub.on_agent_message(&topic, &payload, NOW_MS + 3);
        assert_eq!(hub.agent("edge-z").unwrap().identity, Some(new.public()));
    }

    #[test]
    fn a_pending_agent_never_registered_can_be_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = hub(dir.path(), &SecretKey::from_seed([1; 32]));
        hub.admission = Admission::Accept;
        let (topic, payload) = signed_birth("edge-p", 1, &SecretKey::from_seed([31; 32]));
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert_eq!(hub.pending_count(), 1);

        hub.forget_agent("edge-p", NOW_MS).unwrap();
        assert_eq!(hub.pending_count(), 0);
        assert!(matches!(
            hub.forget_agent("edge-p", NOW_MS),
            Err(HubError::NotFound(_))
        ));
    }

    #[test]
    fn a_birth_too_large_is_not_held_for_acceptance() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = hub(dir.path(), &SecretKey::from_seed([1; 32]));
        hub.admission = Admission::Accept;
        let key = SecretKey::from_seed([32; 32]);
        let mut birth = crate::server::registry::test_birth(1, key.public());
        birth
            .labels
            .insert("padding".into(), "x".repeat(MAX_PENDING_BIRTH_BYTES));
        let (topic, payload) = signed_presence("edge-big", Presence::Online(birth), &key);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert_eq!(hub.pending_count(), 0);
        assert_eq!(hub.dropped().unauthenticated, 1);

        let (topic, payload) = signed_birth("edge-big", 2, &key);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert_eq!(hub.pending_count(), 1, "an ordinary birth is held");
    }

    #[test]
    fn a_new_agent_whose_pending_birth_another_key_replaced_can_be_approved_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = hub(dir.path(), &SecretKey::from_seed([1; 32]));
        hub.admission = Admission::Accept;
        let (device, squatter) = (
            SecretKey::from_seed([33; 32]),
            SecretKey::from_seed([34; 32]),
        );
        let (topic, payload) = signed_birth("edge-s", 1, &device);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        let (topic, payload) = signed_birth("edge-s", 9, &squatter);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert_eq!(
            hub.pending_agents(None, usize::MAX)[0].identity,
            squatter.public()
        );

        let approval = hub.approve_agent("edge-s", &device.public().id(), NOW_MS);
        assert!(matches!(approval, Ok(Approval::Ahead)), "{approval:?}");
        assert_eq!(
            hub.pending_agents(None, usize::MAX)[0].approved_key_id,
            Some(device.public().id().0.to_hex()),
            "the list shows the key that will be let in"
        );
        let (topic, payload) = signed_birth("edge-s", 10, &squatter);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert!(hub.agent("edge-s").is_err());

        // The device reconnects: it registers, and the squatter's birth is no longer held.
        let (topic, payload) = signed_birth("edge-s", 2, &device);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert_eq!(hub.agent("edge-s").unwrap().identity, Some(device.public()));
        assert_eq!(hub.pending_count(), 0);
    }

    #[test]
    fn a_registered_agent_back_with_its_own_key_clears_an_impostor_s_pending_birth() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = hub(dir.path(), &SecretKey::from_seed([1; 32]));
        let (device, impostor) = (
            SecretKey::from_seed([35; 32]),
            SecretKey::from_seed([36; 32]),
        );
        let (topic, payload) = signed_birth("edge-r", 1, &device);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        let (topic, payload) = signed_birth("edge-r", 5, &impostor);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert_eq!(hub.pending_count(), 1, "held as a possible reset device");

        // A replay of the device's own earlier birth changes nothing ...
        let (topic, payload) = signed_birth("edge-r", 1, &device);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert_eq!(hub.pending_count(), 1);
        // ... its next session shows it still holds its key.
        let (topic, payload) = signed_birth("edge-r", 2, &device);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert_eq!(hub.pending_count(), 0);
        assert_eq!(hub.agent("edge-r").unwrap().identity, Some(device.public()));
    }

    #[test]
    fn births_waiting_for_acceptance_are_held_only_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = hub(dir.path(), &SecretKey::from_seed([1; 32]));
        hub.admission = Admission::Accept;
        hub.pending_limit = 2;
        for (n, agent) in ["edge-1", "edge-2", "edge-3"].into_iter().enumerate() {
            let (topic, payload) =
                signed_birth(agent, 1, &SecretKey::from_seed([n as u8 + 10; 32]));
            hub.on_agent_message(&topic, &payload, NOW_MS);
        }
        let held: Vec<String> = hub
            .pending_agents(None, usize::MAX)
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(held, ["edge-1", "edge-2"]);
        let page: Vec<String> = hub
            .pending_agents(Some("edge-1"), 1)
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(page, ["edge-2"], "paged by id");
        assert_eq!(hub.dropped().unauthenticated, 3);

        // One already held is still replaced by its newer birth, under another key.
        let other = SecretKey::from_seed([99; 32]);
        let (topic, payload) = signed_birth("edge-2", 2, &other);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        let edge_2 = hub
            .pending_agents(None, usize::MAX)
            .into_iter()
            .find(|p| p.id == "edge-2")
            .unwrap();
        assert_eq!(edge_2.identity, other.public());
        assert_eq!(hub.all_agents().count(), 0, "nothing registered");

        // Each key it offers is not logged again at once, but is after a while.
        let logged = |hub: &Hub| {
            let about = |e: &EventRecord| e.agent.as_deref() == Some("edge-2");
            hub.store().events(0, 100, about).unwrap().len()
        };
        assert_eq!(logged(&hub), 1);
        let later = NOW_MS + PENDING_LOG_INTERVAL_MS;
        let (topic, payload) = signed_birth("edge-2", 3, &SecretKey::from_seed([98; 32]));
        hub.on_agent_message(&topic, &payload, later);
        assert_eq!(logged(&hub), 2);
    }

    #[test]
    fn an_agent_known_from_before_reports_were_signed_registers_its_key_under_acceptance() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = hub(dir.path(), &SecretKey::from_seed([1; 32]));
        hub.admission = Admission::Accept;
        let old = AgentRecord::new("edge-old", NOW_MS);
        assert_eq!(old.identity, None);
        hub.agents.insert(old.id.clone(), old);

        let key = SecretKey::from_seed([7; 32]);
        let (topic, payload) = signed_birth("edge-old", 1, &key);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert_eq!(hub.pending_count(), 0);
        let record = hub.agent("edge-old").unwrap();
        assert_eq!(record.identity, Some(key.public()));
        assert!(record.online);
    }

    #[test]
    fn a_key_approved_ahead_registers_its_agent_and_no_other_key_does() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = hub(dir.path(), &SecretKey::from_seed([1; 32]));
        hub.admission = Admission::Accept;
        let device = SecretKey::from_seed([20; 32]);
        let approved = hub
            .approve_agent("edge-new", &device.public().id(), NOW_MS)
            .unwrap();
        assert!(matches!(approved, Approval::Ahead));
        assert_eq!(
            hub.store().approvals().unwrap().len(),
            1,
            "kept in the store"
        );

        // Another key under that id waits, naming the approved one.
        let squatter = SecretKey::from_seed([21; 32]);
        let (topic, payload) = signed_birth("edge-new", 1, &squatter);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert!(hub.agent("edge-new").is_err());
        let waiting = hub.pending_agents(None, usize::MAX);
        assert_eq!(
            waiting[0].approved_key_id,
            Some(device.public().id().0.to_hex())
        );

        // The device's own first birth registers it, under acceptance, and uses the approval up.
        let (topic, payload) = signed_birth("edge-new", 2, &device);
        hub.on_agent_message(&topic, &payload, NOW_MS);
        let record = hub.agent("edge-new").unwrap();
        assert!(record.online);
        assert_eq!(record.identity, Some(device.public()));
        assert!(hub.approvals().is_empty());
        assert!(hub.store().approvals().unwrap().is_empty());

        // A registered agent waits for nothing; an approval for one not seen is withdrawn by
        // forgetting it.
        let again = hub.approve_agent("edge-new", &device.public().id(), NOW_MS);
        assert!(matches!(again, Err(HubError::Conflict(_))), "{again:?}");
        hub.approve_agent("edge-later", &device.public().id(), NOW_MS)
            .unwrap();
        hub.forget_agent("edge-later", NOW_MS).unwrap();
        assert!(hub.approvals().is_empty());
        assert!(matches!(
            hub.approve_agent("bad/id", &device.public().id(), NOW_MS),
            Err(HubError::Invalid(_))
        ));
    }

    #[test]
    fn under_open_admission_an_approval_still_keeps_other_keys_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = hub(dir.path(), &SecretKey::from_seed([1; 32]));
        let device = SecretKey::from_seed([22; 32]);
        hub.approve_agent("edge-pinned", &device.public().id(), NOW_MS)
            .unwrap();
        let (topic, payload) = signed_birth("edge-pinned", 1, &SecretKey::from_seed([23; 32]));
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert!(hub.agent("edge-pinned").is_err(), "first use does not win");
        assert_eq!(hub.pending_count(), 1);
        // Other ids still register on first use.
        let (topic, payload) = signed_birth("edge-free", 1, &SecretKey::from_seed([24; 32]));
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert!(hub.agent("edge-free").unwrap().online);
    }

    #[test]
    fn a_key_set_counts_new_signers_of_bundles_its_scan_did_not_read() {
        let (old, fresh) = (SecretKey::from_seed([1; 32]), SecretKey::from_seed([2; 32]));
        let (_dir, mut hub, digest, _) = hub_holding(&old, &[&old, &fresh]);
        assert_eq!(signers(&hub, &digest), [old.public().id()]);

        // Uploaded after the scan was taken, so the scan knows nothing of it.
        let set = next_set(&fresh, &[&old, &fresh]);
        assert_eq!(
            hub.unlearned_signers(&hub.check_key_set(&set).unwrap().keys),
            [(digest, vec![fresh.public()])]
        );
        hub.add_key_set(set, SignerScan::default(), false, NOW_MS)
            .unwrap();
        assert_eq!(
            signers(&hub, &digest),
            [old.public().id(), fresh.public().id()]
        );
    }

    #[test]
    fn an_agent_reporting_another_chain_of_key_sets_is_flagged_once() {
        let (old, fresh) = (SecretKey::from_seed([1; 32]), SecretKey::from_seed([2; 32]));
        let dir = tempfile::tempdir().unwrap();
        let mut hub = hub(dir.path(), &old);
        let ours = next_set(&fresh, &[&old, &fresh]);
        hub.add_key_set(ours.clone(), SignerScan::default(), false, NOW_MS)
            .unwrap();
        // Another set 2, signed by the same keys: a fork only key holders could make.
        let mut theirs = SignedKeySet::new(&KeySet::new(2, vec![old.public()], 1, 7));
        theirs.add_signature(&old);
        assert_ne!(ours.digest(), theirs.digest());

        let key = SecretKey::from_seed([41; 32]);
        let birth_on = |session: u64, digest: Option<Sha256Digest>| {
            let mut birth = crate::server::registry::test_birth(session, key.public());
            birth.key_set = 2;
            birth.key_set_digest = digest;
            signed_presence("edge-k", Presence::Online(birth), &key)
        };
        for (session, digest) in [(1, Some(ours.digest())), (2, None)] {
            let (topic, payload) = birth_on(session, digest);
            hub.on_agent_message(&topic, &payload, NOW_MS);
            let record = hub.agent("edge-k").unwrap();
            assert_eq!(hub.key_set_fork(&record), None, "{digest:?}");
        }
        for session in [3, 4] {
            let (topic, payload) = birth_on(session, Some(theirs.digest()));
            hub.on_agent_message(&topic, &payload, NOW_MS);
        }
        let record = hub.agent("edge-k").unwrap();
        assert_eq!(hub.key_set_fork(&record), Some(ours.digest()));
        assert_eq!(
            events_about(&hub, "edge-k", "key_set_forked"),
            1,
            "logged once"
        );

        let (topic, payload) = birth_on(5, Some(ours.digest()));
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert_eq!(hub.key_set_fork(&hub.agent("edge-k").unwrap()), None);
        let (topic, payload) = birth_on(6, Some(theirs.digest()));
        hub.on_agent_message(&topic, &payload, NOW_MS);
        assert_eq!(
            events_about(&hub, "edge-k", "key_set_forked"),
            2,
            "logged again once it came back after it had left the fork"
        );
    }

    #[test]
    fn a_rollout_of_a_bundle_that_has_expired_since_its_upload_is_refused() {
        let publisher = SecretKey::from_seed([1; 32]);
        let (_dir, mut hub, _, expires_at) = hub_holding(&publisher, &[&publisher]);
        let spec = RolloutSpec::from_json(
            r#"{"bundle": "tiny-bert-embed@1.0.0", "selector": "",
                "waves": [{"size": {"percent": 100}, "bake_secs": 1}]}"#,
        )
        .unwrap();

        // Still valid: refused only because no agent is there to take it.
        let last_valid_ms = expires_at * 1000 + 999;
        let err = hub
            .create_rollout(None, spec.clone(), last_valid_ms)
            .unwrap_err();
        assert!(err.to_string().contains("matches no agent"), "{err}");
        let err = hub
            .create_rollout(None, spec, last_valid_ms + 1)
            .unwrap_err();
        assert!(matches!(err, HubError::Invalid(_)), "{err:?}");
        let expired = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires_at),
        );
        assert_eq!(
            err.to_string(),
            format!(
                "tiny-bert-embed@1.0.0 expired at {expired}: agents would refuse it; pack and push a newer release"
            )
        );
    }

    #[test]
    fn a_key_set_takes_the_scan_s_word_for_bundles_it_read() {
        let (old, fresh) = (SecretKey::from_seed([1; 32]), SecretKey::from_seed([2; 32]));
        let (_dir, mut hub, digest, _) = hub_holding(&old, &[&old, &fresh]);

        let set = next_set(&fresh, &[&old, &fresh]);
        let candidates = hub.unlearned_signers(&hub.check_key_set(&set).unwrap().keys);
        let scan = SignerScan::run(&hub.store, candidates).unwrap();
        assert!(scan.verdicts[&(digest, fresh.public().id())]);
        // What a scan found is taken as found: the bundle is not read again under the lock.
        let scan = SignerScan {
            verdicts: BTreeMap::from([((digest, fresh.public().id()), false)]),
        };
        hub.add_key_set(set, scan, false, NOW_MS).unwrap();
        assert_eq!(signers(&hub, &digest), [old.public().id()]);
    }
}
