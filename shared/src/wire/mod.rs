//! MQTT wire format between agents and the control plane: topic names and the CBOR envelope.
//!
//! Every message is an [`Envelope`] carrying the protocol version, the sender, and a per-sender
//! sequence number so receivers can see gaps. What an agent publishes on its own topics travels
//! as a [`SignedReport`]: the envelope's bytes under the agent's own signature, so the control
//! plane believes a report only from the key the agent first registered, whatever the broker
//! lets clients publish. Topic names are built only here, from identifiers checked by
//! [`check_agent_id`], so no identifier can inject MQTT wildcards or extra levels.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;
use crate::keys::{PublicKey, SecretKey};

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
    /// A bare envelope where a [`SignedReport`] belongs (an agent that does not sign).
    #[error("unsigned report: agents must sign what they publish on their own topics")]
    Unsigned,
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
        check_version(bytes)?;
        serde_cbor::from_slice(bytes).map_err(|e| WireError::Decode(e.to_string()))
    }
}

fn check_version(bytes: &[u8]) -> Result<(), WireError> {
    let head: EnvelopeHead =
        serde_cbor::from_slice(bytes).map_err(|e| WireError::Decode(e.to_string()))?;
    if head.v != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion(head.v));
    }
    Ok(())
}

/// What agent report signatures cover before the topic and the envelope: no such signature
/// can pass for one on a manifest, a desired state or a key set.
const REPORT_CONTEXT: &[u8] = b"flotilla/v1 agent report\0";

/// An agent's report as it travels on one of its own topics: an encoded [`Envelope`] and the
/// agent's ed25519 signature over the topic and those bytes. Binding the topic keeps a
/// report from being replayed on another agent's topics or as another kind of message;
/// replays on the same topic are the receiver's to refuse, by session and sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedReport {
    /// [`PROTOCOL_VERSION`] of the sender, first, as in an [`Envelope`].
    pub v: u16,
    /// The encoded envelope, exactly as signed.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
    /// Ed25519 signature by the agent's identity key.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl SignedReport {
    /// Signs an encoded envelope for publishing on `topic`, returning the wire bytes.
    pub fn seal(topic: &str, envelope: Vec<u8>, key: &SecretKey) -> Vec<u8> {
        let signature = key.sign(&report_message(topic, &envelope)).to_vec();
        let report = Self {
            v: PROTOCOL_VERSION,
            envelope,
            signature,
        };
        serde_cbor::to_vec(&report).expect("invariant: wire types always encode as CBOR")
    }

    /// Decodes wire bytes, checking the protocol version first. The signature is not checked
    /// yet: which key must have made it may depend on the envelope (a birth names its key).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        check_version(bytes)?;
        serde_cbor::from_slice(bytes).map_err(|e| {
            match serde_cbor::from_slice::<Envelope<serde_cbor::Value>>(bytes) {
                Ok(_) => WireError::Unsigned,
                Err(_) => WireError::Decode(e.to_string()),
            }
        })
    }

    /// Decodes the envelope inside, still unauthenticated.
    pub fn envelope<T: DeserializeOwned>(&self) -> Result<Envelope<T>, WireError> {
        Envelope::decode(&self.envelope)
    }

    /// Whether `key` signed this report for `topic`.
    pub fn is_signed_by(&self, topic: &str, key: &PublicKey) -> bool {
        key.verify_strict_bytes(&report_message(topic, &self.envelope), &self.signature)
    }
}

fn report_message(topic: &str, envelope: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(REPORT_CONTEXT.len() + topic.len() + 1 + envelope.len());
    message.extend_from_slice(REPORT_CONTEXT);
    message.extend_from_slice(topic.as_bytes());
    message.push(0);
    message.extend_from_slice(envelope);
    message
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
    fn a_signed_report_opens_only_with_its_key_and_its_topic() {
        let key = SecretKey::from_seed([5; 32]);
        let topic = topics::agent_telemetry("edge-1");
        let env = Envelope::new("edge-1", 3, 0, Ping { n: 1 });
        let wire = SignedReport::seal(&topic, env.encode(), &key);

        let report = SignedReport::decode(&wire).unwrap();
        assert!(report.is_signed_by(&topic, &key.public()));
        assert_eq!(report.envelope::<Ping>().unwrap(), env);

        let other = SecretKey::from_seed([6; 32]).public();
        assert!(!report.is_signed_by(&topic, &other));
        assert!(!report.is_signed_by(&topics::agent_state("edge-1"), &key.public()));
        assert!(!report.is_signed_by(&topics::agent_telemetry("edge-2"), &key.public()));

        let mut tampered = report.clone();
        *tampered.envelope.last_mut().unwrap() ^= 1;
        assert!(!tampered.is_signed_by(&topic, &key.public()));
    }

    #[test]
    fn a_bare_envelope_is_refused_as_unsigned() {
        let bare = Envelope::new("edge-1", 1, 0, Ping { n: 1 }).encode();
        assert_eq!(SignedReport::decode(&bare), Err(WireError::Unsigned));
        assert!(matches!(
            SignedReport::decode(b"\xff\x00garbage"),
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
