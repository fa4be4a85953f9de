//! MQTT wire format between agents and the control plane: topic names and the CBOR envelope.
//!
//! Every message is an [`Envelope`] carrying the protocol version, the sender, and a per-sender
//! sequence number so receivers can see gaps. Topic names are built only here, from identifiers
//! checked by [`check_agent_id`], so no identifier can inject MQTT wildcards or extra levels.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;

mod messages;
pub use messages::*;

/// Version of the envelope and message bodies; receivers refuse others.
pub const PROTOCOL_VERSION: u16 = 1;

/// Prefix of every Flotilla topic.
pub const TOPIC_ROOT: &str = "flotilla/v1";

/// Topic names.
pub mod topics {
    use super::{Sha256Digest, TOPIC_ROOT};

    /// Retained presence: an agent's birth message, replaced by its will when it drops.
    pub fn agent_state(agent: &str) -> String {
        format!("{TOPIC_ROOT}/agents/{agent}/state")
    }

    /// An agent's telemetry: heartbeats and events in one ordered stream, so one sequence
    /// number per agent reveals any gap.
    pub fn agent_telemetry(agent: &str) -> String {
        format!("{TOPIC_ROOT}/agents/{agent}/telemetry")
    }

    /// Retained, signed desired state for one agent, from the control plane.
    pub fn agent_desired(agent: &str) -> String {
        format!("{TOPIC_ROOT}/agents/{agent}/desired")
    }

    /// Chunk requests for one bundle, from any agent to the control plane.
    pub fn bundle_requests(digest: &Sha256Digest) -> String {
        format!("{TOPIC_ROOT}/bundles/{digest}/requests")
    }

    /// Chunks of one bundle, published once for every agent downloading it.
    pub fn bundle_chunks(digest: &Sha256Digest) -> String {
        format!("{TOPIC_ROOT}/bundles/{digest}/chunks")
    }

    /// Retained [`super::ControlPlaneState`]: whether the control plane listens to agents.
    pub fn control_plane_state() -> String {
        format!("{TOPIC_ROOT}/control-plane/state")
    }

    /// Subscription filter matching one kind of per-agent topic for all agents.
    pub fn all_agents(kind: &str) -> String {
        format!("{TOPIC_ROOT}/agents/+/{kind}")
    }

    /// The agent id in a per-agent topic, if the topic is one.
    pub fn agent_of(topic: &str) -> Option<&str> {
        let rest = topic.strip_prefix(TOPIC_ROOT)?.strip_prefix("/agents/")?;
        let (agent, _kind) = rest.split_once('/')?;
        Some(agent)
    }
}

/// Agent ids: 1 to 64 characters of `[A-Za-z0-9._-]`, so they are safe in topics and paths.
pub fn check_agent_id(id: &str) -> Result<(), String> {
    let valid_chars = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if id.is_empty() || id.len() > 64 || !valid_chars || id.starts_with('.') {
        return Err(format!(
            "agent id {id:?} must be 1-64 characters of [A-Za-z0-9._-]"
        ));
    }
    Ok(())
}

/// Every MQTT payload Flotilla sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub v: u16,
    /// Sender id: an agent id, or `control-plane`.
    pub from: String,
    /// Per-sender counter; consecutive messages of one stream differ by one.
    pub seq: u64,
    /// Sender's clock, Unix milliseconds.
    pub sent_at_ms: u64,
    /// The message itself.
    pub body: T,
}

#[derive(Deserialize)]
struct EnvelopeHead {
    v: u16,
}

/// Why an MQTT payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not CBOR of the expected shape.
    #[error("malformed message: {0}")]
    Decode(String),
    /// Sent by a peer speaking another protocol version.
    #[error("unsupported protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u16),
}

impl<T: Serialize> Envelope<T> {
    /// Wraps a body for sending.
    pub fn new(from: impl Into<String>, seq: u64, sent_at_ms: u64, body: T) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            from: from.into(),
            seq,
            sent_at_ms,
            body,
        }
    }

    /// CBOR bytes for the wire.
    pub fn encode(&self) -> Vec<u8> {
        serde_cbor::to_vec(self).expect("invariant: wire types always encode as CBOR")
    }
}

impl<T: DeserializeOwned> Envelope<T> {
    /// Decodes wire bytes, checking the protocol version before the body.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let head: EnvelopeHead =
            serde_cbor::from_slice(bytes).map_err(|e| WireError::Decode(e.to_string()))?;
        if head.v != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion(head.v));
        }
        serde_cbor::from_slice(bytes).map_err(|e| WireError::Decode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Ping {
        n: u32,
    }

    #[test]
    fn envelope_round_trips() {
        let env = Envelope::new("edge-1", 7, 1_700_000_000_000, Ping { n: 3 });
        assert_eq!(Envelope::<Ping>::decode(&env.encode()).unwrap(), env);
    }

    #[test]
    fn other_protocol_versions_are_refused_before_the_body() {
        let mut env = Envelope::new("edge-1", 1, 0, "anything");
        env.v = 99;
        let err = Envelope::<Ping>::decode(&env.encode()).unwrap_err();
        assert_eq!(err, WireError::UnsupportedVersion(99));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(matches!(
            Envelope::<Ping>::decode(b"\xff\x00garbage"),
            Err(WireError::Decode(_))
        ));
    }

    #[test]
    fn agent_ids_cannot_inject_topic_levels() {
        assert!(check_agent_id("edge-01.site_a").is_ok());
        for bad in ["", "a/b", "+", "#", "a b", ".hidden", &"x".repeat(65)] {
            assert!(check_agent_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn agent_is_recovered_from_its_topics() {
        assert_eq!(
            topics::agent_of(&topics::agent_telemetry("edge-1")),
            Some("edge-1")
        );
        assert_eq!(topics::agent_of("flotilla/v1/bundles/x/chunks"), None);
    }
}
