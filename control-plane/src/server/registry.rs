//! The fleet registry: what the server knows of each agent, updated from its MQTT reports.
//!
//! Presence follows the agent's session counter: a birth raises the session, and a will (or
//! any presence message) from an older session is stale and ignored, so a late will never
//! marks a reconnected agent offline. A will ends its session for good: that session's birth
//! again (a replay of the signed message, which anyone on the broker could have kept) is
//! stale too, because an agent takes a new session number for every connection. Telemetry
//! carries a per-agent sequence number; the registry counts gaps (items that never arrived) and drops duplicates (QoS 1 redeliveries).

use std::collections::BTreeMap;

use flotilla_shared::wire::{
    ActiveModel, Birth, Capabilities, DesiredBundle, Health, Heartbeat, HostMetrics, VersionMetrics,
};
use flotilla_shared::{PublicKey, Sha256Digest};
use serde::{Deserialize, Serialize};

/// Everything the server keeps about one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentRecord {
    /// Agent id.
    pub id: String,
    /// Labels from its latest birth.
    pub labels: BTreeMap<String, String>,
    /// Capabilities from its latest birth.
    #[schema(value_type = Option<Object>)]
    pub capabilities: Option<Capabilities>,
    /// Whether it is connected.
    pub online: bool,
    /// Session counter of its latest birth.
    pub session: u64,
    /// When presence last changed, Unix milliseconds.
    pub presence_since_ms: u64,
    /// When the server first heard of it.
    pub first_seen_ms: u64,
    /// When the server last heard from it.
    pub last_seen_ms: u64,
    /// When its latest heartbeat arrived.
    pub last_heartbeat_ms: Option<u64>,
    /// The model it serves, as last reported.
    #[schema(value_type = Option<Object>)]
    pub active: Option<ActiveModel>,
    /// Health, as last reported.
    #[schema(value_type = Option<Object>)]
    pub health: Option<Health>,
    /// Host resource use, as last reported.
    #[schema(value_type = Option<Object>)]
    pub host: Option<HostMetrics>,
    /// Per-version inference metrics, as last reported (cumulative since the agent started).
    #[schema(value_type = Vec<Object>)]
    pub models: Vec<VersionMetrics>,
    /// Highest telemetry sequence number received.
    pub last_seq: Option<u64>,
    /// Telemetry items received.
    pub telemetry_received: u64,
    /// Telemetry items that never arrived (holes in the sequence).
    pub telemetry_missing: u64,
    /// Telemetry items the agent itself dropped (its offline buffer overflowed).
    pub telemetry_dropped_by_agent: u64,
    /// Version of the publisher key set it trusts, as last reported (0: not reported yet).
    #[serde(default)]
    pub key_set: u64,
    /// Digest of that key set, as last reported (`None`: the keys it was configured with, or
    /// an agent that does not report it).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub key_set_digest: Option<Sha256Digest>,
    /// The key its reports must be signed with: the one its first birth named (hex in JSON;
    /// null only for a record from before agents signed their reports).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub identity: Option<PublicKey>,
    /// Whether the will of `session` was applied: that session is over, and its birth is
    /// not believed again.
    #[serde(default)]
    pub session_ended: bool,
}

/// What a presence message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    /// The agent is now online (it was offline, or it is new).
    CameOnline,
    /// The agent went offline.
    WentOffline,
    /// A new session of an agent that was online (it reconnected before its will arrived).
    Reconnected,
    /// Older than what the registry knows; ignored.
    Stale,
}

/// What a telemetry sequence number said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sequence {
    /// The next one, or after a gap of `missing` items.
    Fresh {
        /// Items skipped since the last one received.
        missing: u64,
    },
    /// Already seen.
    Duplicate,
}

impl AgentRecord {
    /// A record for an agent first heard of now.
    pub fn new(id: &str, now_ms: u64) -> Self {
        Self {
            id: id.to_owned(),
            labels: BTreeMap::new(),
            capabilities: None,
            online: false,
            session: 0,
            presence_since_ms: now_ms,
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
            last_heartbeat_ms: None,
            active: None,
            health: None,
            host: None,
            models: Vec::new(),
            last_seq: None,
            telemetry_received: 0,
            telemetry_missing: 0,
            telemetry_dropped_by_agent: 0,
            key_set: 0,
            key_set_digest: None,
            identity: None,
            session_ended: false,
        }
    }

    /// Applies a birth whose signature the caller checked against the key it names, and
    /// which is the key registered for this agent if one is: that key is registered now.
    pub fn on_birth(&mut self, birth: &Birth, now_ms: u64) -> PresenceChange {
        let ended = birth.session == self.session && self.session_ended;
        if birth.session < self.session || ended {
            return PresenceChange::Stale;
        }
        self.identity = Some(birth.identity);
        let change = if !self.online {
            PresenceChange::CameOnline
        } else if birth.session > self.session {
            PresenceChange::Reconnected
        } else {
            // The same birth again (retained copy after a resubscribe).
            PresenceChange::Stale
        };
        // A birth says what the agent was at the start of its session. The same one again is
        // the broker's retained copy, older than the heartbeats and events since: what the
        // agent serves now must not fall back to what it served when it connected.
        if birth.session > self.session || self.capabilities.is_none() {
            self.labels = birth.labels.clone();
            self.capabilities = Some(birth.capabilities.clone());
            self.active = birth.active.clone();
            self.key_set = birth.key_set;
            self.key_set_digest = birth.key_set_digest;
        }
        if birth.session > self.session {
            self.session_ended = false;
        }
        self.session = birth.session;
        self.last_seen_ms = now_ms;
        if change != PresenceChange::Stale {
            self.online = true;
            self.presence_since_ms = now_ms;
        }
        change
    }

    /// Applies a will (or an offline presence) for `session`.
    pub fn on_offline(&mut self, session: u64, now_ms: u64) -> PresenceChange {
        if session < self.session || !self.online {
            return PresenceChange::Stale;
        }
        self.session_ended = session == self.session;
        self.online = false;
        self.presence_since_ms = now_ms;
        PresenceChange::WentOffline
    }

    /// Marks a silent agent offline; `false` if it already was.
    pub fn time_out(&mut self, now_ms: u64) -> bool {
        if !self.online {
            return false;
        }
        self.online = false;
        self.presence_since_ms = now_ms;
        true
    }

    /// Accounts for a telemetry sequence number.
    pub fn on_sequence(&mut self, seq: u64, now_ms: u64) -> Sequence {
        self.last_seen_ms = now_ms;
        match self.last_seq {
            Some(last) if seq <= last => Sequence::Duplicate,
            last => {
                let missing = match last {
                    Some(last) => seq - last - 1,
                    None => 0,
                };
                self.last_seq = Some(seq);
                self.telemetry_received += 1;
                self.telemetry_missing += missing;
                Sequence::Fresh { missing }
            }
        }
    }

    /// Applies a heartbeat. Telemetry from an agent the registry thinks offline (a will that
    /// raced ahead of queued telemetry, or a timeout) brings it back online, reported as
    /// [`PresenceChange::CameOnline`].
    pub fn on_heartbeat(&mut self, heartbeat: &Heartbeat, now_ms: u64) -> Option<PresenceChange> {
        self.last_heartbeat_ms = Some(now_ms);
        self.active = heartbeat.active.clone();
        self.health = Some(heartbeat.health.clone());
        self.host = Some(heartbeat.host.clone());
        self.models = heartbeat.models.clone();
        self.telemetry_dropped_by_agent = heartbeat.dropped_telemetry;
        self.key_set = heartbeat.key_set;
        self.key_set_digest = heartbeat.key_set_digest;
        if !self.online && heartbeat.session >= self.session && self.session > 0 {
            self.session = heartbeat.session;
            self.online = true;
            self.presence_since_ms = now_ms;
            return Some(PresenceChange::CameOnline);
        }
        None
    }

    /// The bundle it serves, in desired-state terms.
    pub fn running(&self) -> Option<DesiredBundle> {
        self.active.as_ref().map(|a| DesiredBundle {
            digest: a.digest,
            name: a.name.clone(),
            version: a.version.clone(),
        })
    }

    /// `name@version` of what it serves, or `none`.
    pub fn version_label(&self) -> String {
        match &self.active {
            Some(a) => format!("{}@{}", a.name, a.version),
            None => "none".into(),
        }
    }

    /// The health's name: `ok`, `degraded`, `no_model`, or `unknown` before any heartbeat.
    pub fn health_label(&self) -> &'static str {
        match &self.health {
            Some(Health::Ok) => "ok",
            Some(Health::Degraded { .. }) => "degraded",
            Some(Health::NoModel) => "no_model",
            None => "unknown",
        }
    }
}

/// A birth for the server's unit tests: session `session`, label `site=a`, naming `identity`.
#[cfg(test)]
pub(crate) fn test_birth(session: u64, identity: PublicKey) -> Birth {
    Birth {
        session,
        labels: BTreeMap::from([("site".into(), "a".into())]),
        capabilities: flotilla_shared::wire::Capabilities {
            architecture: "x86_64".into(),
            cores: 2,
            memory_bytes: 1 << 30,
            gpu: false,
            backends: vec![],
            agent_version: "0.1.0".into(),
        },
        active: None,
        key_set: 1,
        key_set_digest: None,
        identity,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn birth(session: u64) -> Birth {
        test_birth(
            session,
            flotilla_shared::SecretKey::from_seed([1; 32]).public(),
        )
    }

    #[test]
    fn a_late_will_never_overrides_a_newer_birth() {
        let mut agent = AgentRecord::new("a", 0);
        assert_eq!(agent.on_birth(&birth(1), 1), PresenceChange::CameOnline);
        assert_eq!(agent.on_birth(&birth(2), 2), PresenceChange::Reconnected);
        assert_eq!(agent.on_offline(1, 3), PresenceChange::Stale);
        assert!(agent.online);
        assert_eq!(agent.on_offline(2, 4), PresenceChange::WentOffline);
        assert!(!agent.online);
        assert_eq!(agent.on_birth(&birth(1), 5), PresenceChange::Stale);
        assert!(!agent.online);
        assert_eq!(agent.on_birth(&birth(3), 6), PresenceChange::CameOnline);
        assert_eq!(agent.labels["site"], "a");
    }

    #[test]
    fn a_birth_replayed_after_its_session_s_will_is_stale() {
        let mut agent = AgentRecord::new("a", 0);
        assert_eq!(agent.on_birth(&birth(4), 1), PresenceChange::CameOnline);
        assert_eq!(agent.on_offline(4, 2), PresenceChange::WentOffline);
        assert_eq!(agent.on_birth(&birth(4), 3), PresenceChange::Stale);
        assert!(!agent.online, "a dead agent does not come back by replay");
        assert_eq!(agent.on_offline(4, 4), PresenceChange::Stale);
        assert_eq!(agent.on_birth(&birth(5), 5), PresenceChange::CameOnline);
        assert!(!agent.session_ended);
    }

    #[test]
    fn a_stale_birth_registers_no_key() {
        let mut agent = AgentRecord::new("a", 0);
        agent.on_birth(&birth(3), 1);
        agent.identity = None;
        assert_eq!(agent.on_birth(&birth(2), 2), PresenceChange::Stale);
        assert_eq!(agent.identity, None);
    }

    #[test]
    fn the_retained_copy_of_a_birth_does_not_undo_what_came_after_it() {
        let mut agent = AgentRecord::new("a", 0);
        agent.on_birth(&birth(1), 1);
        let active = ActiveModel {
            name: "m".into(),
            version: "1.0.0".into(),
            digest: flotilla_shared::Sha256Digest::of(b"m"),
            backend: flotilla_shared::manifest::Backend::Tract,
            provider: "cpu".into(),
        };
        agent.active = Some(active.clone());
        // The server resubscribes (say, after a restart) and gets the session's birth again,
        // which says the agent served nothing when it connected.
        assert_eq!(agent.on_birth(&birth(1), 5), PresenceChange::Stale);
        assert_eq!(agent.active, Some(active));
        // A new session's birth is the agent's word on what it serves.
        assert_eq!(agent.on_birth(&birth(2), 6), PresenceChange::Reconnected);
        assert_eq!(agent.active, None);
    }

    #[test]
    fn sequence_gaps_are_counted_and_duplicates_dropped() {
        let mut agent = AgentRecord::new("a", 0);
        assert_eq!(agent.on_sequence(5, 0), Sequence::Fresh { missing: 0 });
        assert_eq!(agent.on_sequence(6, 0), Sequence::Fresh { missing: 0 });
        assert_eq!(agent.on_sequence(6, 0), Sequence::Duplicate);
        assert_eq!(agent.on_sequence(9, 0), Sequence::Fresh { missing: 2 });
        assert_eq!(agent.telemetry_missing, 2);
        assert_eq!(agent.telemetry_received, 3);
    }
}
