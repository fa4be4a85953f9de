//! Message bodies exchanged between agents and the control plane.
//!
//! Agents publish [`Presence`] (retained) and [`Telemetry`]; the control plane publishes a
//! [`SignedDesiredState`] (retained) per agent and answers [`ChunkRequest`]s with [`Chunk`]s on
//! a per-bundle topic every downloader of that bundle listens to. The control plane's own
//! retained [`ControlPlaneState`] tells agents whether anyone is listening to their telemetry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;
use crate::keys::{KeyId, PublicKey, SecretKey};
use crate::manifest::Backend;

/// Retained on `agents/{id}/state`: the birth message while connected, the will after.
// One presence message is built per connection; boxing the birth would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    /// The agent connected; `session` grows with every connection.
    Online(Birth),
    /// The agent's connection ended (its Last Will). A will whose session is older than the
    /// latest birth is stale and must be ignored.
    Offline {
        /// Session of the connection that ended.
        session: u64,
    },
}

impl Presence {
    /// Session counter carried by either form.
    pub fn session(&self) -> u64 {
        match self {
            Self::Online(birth) => birth.session,
            Self::Offline { session } => *session,
        }
    }
}

/// What an agent says about itself when it connects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Birth {
    /// Per-connection counter, persisted by the agent, strictly increasing.
    pub session: u64,
    /// Free-form labels: site, region, hardware class.
    pub labels: BTreeMap<String, String>,
    /// Host and agent capabilities.
    pub capabilities: Capabilities,
    /// Model being served, if any.
    pub active: Option<ActiveModel>,
    /// Version of the publisher key set the agent trusts (0 from agents that predate key
    /// sets), so the control plane signs its desired states with the key that set names.
    #[serde(default)]
    pub key_set: u64,
    /// [`crate::keyset::SignedKeySet::digest`] of that key set; `None` while the agent trusts
    /// the keys it was configured with (and from agents that predate this field).
    #[serde(default)]
    pub key_set_digest: Option<Sha256Digest>,
    /// The agent's own public key, which signs all it reports ([`super::SignedReport`]).
    pub identity: PublicKey,
}

/// Host and agent capabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// CPU architecture (`std::env::consts::ARCH`).
    pub architecture: String,
    /// Logical CPU cores.
    pub cores: u32,
    /// Physical memory in bytes.
    pub memory_bytes: u64,
    /// Whether a usable GPU is present.
    pub gpu: bool,
    /// Backends this agent can run.
    pub backends: Vec<Backend>,
    /// Agent version (semver).
    pub agent_version: String,
}

/// The model an agent serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveModel {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// Bundle digest.
    pub digest: Sha256Digest,
    /// Backend actually running it.
    pub backend: Backend,
    /// Execution provider actually in use (`cpu`, `cuda`, ...).
    pub provider: String,
}

/// One item of an agent's ordered telemetry stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Telemetry {
    /// Periodic health and metrics.
    Heartbeat(Heartbeat),
    /// Something happened.
    Event(Event),
}

/// Periodic health and metrics report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Session the heartbeat was produced in.
    pub session: u64,
    /// Seconds since the agent started.
    pub uptime_s: u64,
    /// Model being served.
    pub active: Option<ActiveModel>,
    /// Overall state.
    pub health: Health,
    /// Host resource use.
    pub host: HostMetrics,
    /// Inference metrics per model version served since start.
    pub models: Vec<VersionMetrics>,
    /// Telemetry items dropped because the offline buffer was full, since start.
    pub dropped_telemetry: u64,
    /// Version of the publisher key set the agent trusts (0 from agents that predate key sets).
    #[serde(default)]
    pub key_set: u64,
    /// Digest of that key set, as in [`Birth::key_set_digest`].
    #[serde(default)]
    pub key_set_digest: Option<Sha256Digest>,
}

/// Overall agent state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Serving normally.
    Ok,
    /// Serving, but on a fallback path; the cause says which.
    Degraded {
        /// Why.
        cause: String,
    },
    /// No model to serve.
    NoModel,
}

/// Host resource use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostMetrics {
    /// Agent resident memory, bytes.
    pub rss_bytes: u64,
    /// Agent CPU use since the previous heartbeat, percent of one core.
    pub cpu_percent: f64,
}

/// Inference metrics of one model version, cumulative since the agent started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionMetrics {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// Bundle digest.
    pub digest: Sha256Digest,
    /// Requests served.
    pub requests: u64,
    /// Requests that failed on the model side (client errors are not counted).
    pub errors: u64,
    /// Latency histogram.
    pub latency: Histogram,
    /// Outcome of the install self-test, if this version was installed in this run.
    pub self_test_passed: Option<bool>,
}

/// A cumulative histogram with fixed bucket bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Upper bounds in milliseconds, ascending; an implicit +Inf bucket follows.
    pub bounds_ms: Vec<f64>,
    /// Count per bucket (not cumulative); one more entry than `bounds_ms`.
    pub counts: Vec<u64>,
    /// Sum of all observations, milliseconds.
    pub sum_ms: f64,
}

/// Default latency buckets: 0.5 ms to 10 s.
pub const LATENCY_BOUNDS_MS: [f64; 16] = [
    0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
    10000.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Self {
            bounds_ms: LATENCY_BOUNDS_MS.to_vec(),
            counts: vec![0; LATENCY_BOUNDS_MS.len() + 1],
            sum_ms: 0.0,
        }
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&mut self, ms: f64) {
        let bucket = self
            .bounds_ms
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(self.bounds_ms.len());
        if let Some(c) = self.counts.get_mut(bucket) {
            *c += 1;
        }
        self.sum_ms += ms;
    }

    /// Total observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Estimated quantile `q` in (0, 1], interpolating linearly inside the bucket; `None` when
    /// empty. Observations above the last bound are reported at the last bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut seen = 0u64;
        for (i, count) in self.counts.iter().enumerate() {
            if *count == 0 {
                continue;
            }
            if (seen + count) as f64 >= rank {
                let lower = if i == 0 { 0.0 } else { self.bounds_ms[i - 1] };
                let Some(upper) = self.bounds_ms.get(i).copied() else {
                    return Some(lower);
                };
                let within = (rank - seen as f64) / *count as f64;
                return Some(lower + (upper - lower) * within);
            }
            seen += count;
        }
        self.bounds_ms.last().copied()
    }

    /// Observations in `self` that are not in `earlier` (same bounds), for windowed views.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        if earlier.bounds_ms != self.bounds_ms || earlier.counts.len() != self.counts.len() {
            return self.clone();
        }
        Histogram {
            bounds_ms: self.bounds_ms.clone(),
            counts: self
                .counts
                .iter()
                .zip(&earlier.counts)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            sum_ms: (self.sum_ms - earlier.sum_ms).max(0.0),
        }
    }
}

/// Something notable an agent reports as it happens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Session it happened in.
    pub session: u64,
    /// Rollout the event belongs to, if any.
    pub rollout: Option<String>,
    /// Bundle concerned, if any.
    pub digest: Option<Sha256Digest>,
    /// What happened.
    pub kind: EventKind,
}

/// Kinds of agent events. Install steps come in order: downloading, verifying, staged,
/// self-test result, active; `install_failed` may end the sequence at any step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Chunks arriving.
    Downloading {
        /// Chunks held.
        received: u32,
        /// Chunks in the bundle.
        total: u32,
    },
    /// Whole-bundle verification started.
    Verifying,
    /// Extracted beside the active model and loaded.
    Staged,
    /// Self-tests passed.
    SelfTestPassed,
    /// A self-test failed; the install stops.
    SelfTestFailed {
        /// Which test and by how much.
        reason: String,
    },
    /// The bundle is now serving.
    Active {
        /// Model name.
        name: String,
        /// Model version.
        version: String,
    },
    /// The install failed at `stage`; the previous model keeps serving.
    InstallFailed {
        /// Step that failed: download, verify, stage, self_test, activate.
        stage: String,
        /// Why.
        reason: String,
    },
    /// A desired-state message was ignored (unsigned, wrong key, other agent, stale).
    DesiredStateRejected {
        /// Why.
        reason: String,
    },
    /// Serving continues on a fallback path.
    Degraded {
        /// Why.
        cause: String,
    },
    /// The agent now trusts a new publisher key set.
    KeySetApplied {
        /// The set's version.
        version: u64,
        /// Its [`crate::keyset::SignedKeySet::digest`] (`None` from agents that predate it).
        #[serde(default)]
        digest: Option<Sha256Digest>,
        /// Its publisher keys.
        publishers: Vec<KeyId>,
        /// Distinct signatures a bundle needs from now on.
        threshold: u32,
        /// The control-plane key it named, if it named one.
        control_plane: Option<KeyId>,
        /// Models whose sequence floor it reset.
        reset_floors: Vec<String>,
        /// Whether the bundle being served is signed by the new keys. When it is not, it keeps
        /// serving, but a restart will not load it again.
        active_trusted: bool,
    },
    /// A key set a desired state carried was not applied.
    KeySetRejected {
        /// Why.
        reason: String,
    },
    /// The agent started and is serving what it reports.
    Started {
        /// Model being served after start, if any.
        active: Option<ActiveModel>,
    },
}

/// Retained on [`topics::control_plane_state`](super::topics::control_plane_state): whether
/// the control plane is connected and subscribed to agents' topics.
///
/// The control plane publishes `online` after its subscriptions on every connection, and its
/// Last Will says `offline`. A broker forwards a message only to the subscriptions it has when
/// the message arrives, so agents hold telemetry back until they have seen `online` on their
/// current connection: nothing goes into a broker nobody listens to (after a broker restart,
/// or while the control plane is down). The same idea as Sparkplug's host application STATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlPlaneState {
    /// Whether the control plane is listening.
    pub online: bool,
    /// When the control-plane process started, Unix milliseconds. Its will carries the same
    /// value, so the late will of an earlier process is recognisably stale.
    pub epoch: u64,
}

impl ControlPlaneState {
    /// Whether a receiver that last followed `newest` should follow this message. `online`
    /// always counts (a control plane whose clock stepped back is still the one listening);
    /// `offline` only when it is not older than `newest`, since a process's will follows its
    /// own announcement and an earlier process's will is stale.
    pub fn supersedes(&self, newest: Option<&ControlPlaneState>) -> bool {
        self.online || newest.is_none_or(|newest| self.epoch >= newest.epoch)
    }
}

/// What the control plane wants one agent to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// The agent this is for; agents ignore states addressed to others.
    pub agent: String,
    /// Per-agent counter; agents ignore states older than the newest they applied.
    pub generation: u64,
    /// The bundle to run; `None` means keep whatever runs.
    pub bundle: Option<DesiredBundle>,
    /// Rollout that set this state, echoed in the agent's events.
    pub rollout: Option<String>,
    /// Control plane's clock, Unix milliseconds.
    pub issued_at_ms: u64,
    /// The publisher key sets after the fleet's first, oldest first. The agent follows them
    /// (each checked against the one before, see [`crate::keyset`]) before it acts on the
    /// bundle, so a bundle signed by new keys never arrives ahead of the keys. Carried inside
    /// the signed state, so pushing a key set to agents also takes the control plane's key.
    #[serde(default)]
    pub key_sets: Vec<crate::keyset::SignedKeySet>,
}

/// A bundle reference in a desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredBundle {
    /// Bundle digest; what the agent fetches and checks.
    pub digest: Sha256Digest,
    /// Model name, for display.
    pub name: String,
    /// Model version, for display.
    pub version: String,
}

/// A desired state with the control plane's signature over its exact CBOR bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDesiredState {
    /// CBOR of a [`DesiredState`].
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
    /// Signing key.
    pub key_id: KeyId,
    /// Ed25519 signature over `state`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
    /// Signatures over `state` by the control plane's earlier keys, which agents that have not
    /// followed the key set naming the newest one still trust.
    #[serde(default)]
    pub also: Vec<crate::bundle::Signature>,
}

/// Why a signed desired state was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DesiredStateError {
    /// Signed by a key other than the control plane's.
    #[error("desired state signed by unknown key {0}")]
    UnknownKey(KeyId),
    /// The signature does not verify.
    #[error("desired state signature does not verify")]
    BadSignature,
    /// The signed bytes are not a desired state.
    #[error("malformed desired state: {0}")]
    Malformed(String),
}

impl SignedDesiredState {
    /// Encodes and signs `state` with the control plane's key.
    pub fn sign(state: &DesiredState, key: &SecretKey) -> Self {
        Self::sign_all(state, key, &[])
    }

    /// Encodes and signs `state` with the control plane's newest key and each earlier one.
    pub fn sign_all(state: &DesiredState, newest: &SecretKey, earlier: &[&SecretKey]) -> Self {
        let bytes = serde_cbor::to_vec(state).expect("invariant: wire types always encode as CBOR");
        let also = earlier
            .iter()
            .map(|key| crate::bundle::Signature {
                key_id: key.public().id(),
                signature: key.sign(&bytes).to_vec(),
            })
            .collect();
        Self {
            signature: newest.sign(&bytes).to_vec(),
            key_id: newest.public().id(),
            state: bytes,
            also,
        }
    }

    /// Checks the signature by the control plane's key (the main one, or one of `also`),
    /// then decodes.
    pub fn open(&self, control_plane: &PublicKey) -> Result<DesiredState, DesiredStateError> {
        let id = control_plane.id();
        let signature = if self.key_id == id {
            &self.signature
        } else {
            match self.also.iter().find(|s| s.key_id == id) {
                Some(also) => &also.signature,
                None => return Err(DesiredStateError::UnknownKey(self.key_id)),
            }
        };
        if !control_plane.verify_strict_bytes(&self.state, signature) {
            return Err(DesiredStateError::BadSignature);
        }
        serde_cbor::from_slice(&self.state).map_err(|e| DesiredStateError::Malformed(e.to_string()))
    }
}

/// Published by a downloader on `bundles/{digest}/requests`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    /// Requesting agent.
    pub agent: String,
    /// Whether the header (container up to the payload) is wanted.
    pub header: bool,
    /// Payload chunk indices wanted.
    pub chunks: Vec<u32>,
}

/// Published by the control plane on `bundles/{digest}/chunks`, once for all listeners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Which part this is.
    pub part: ChunkPart,
    /// The bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// A part of a bundle in transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkPart {
    /// Magic, manifest and signatures: everything before the payload.
    Header,
    /// Payload chunk by index.
    Payload(u32),
    /// The server does not hold this bundle.
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_state_opens_only_with_the_control_plane_key() {
        let cp = SecretKey::from_seed([5; 32]);
        let other = SecretKey::from_seed([6; 32]);
        let state = DesiredState {
            agent: "edge-1".into(),
            generation: 3,
            bundle: None,
            rollout: Some("r1".into()),
            issued_at_ms: 1,
            key_sets: vec![],
        };
        let signed = SignedDesiredState::sign(&state, &cp);
        assert_eq!(signed.open(&cp.public()).unwrap(), state);
        assert!(matches!(
            signed.open(&other.public()),
            Err(DesiredStateError::UnknownKey(_))
        ));

        let mut forged = SignedDesiredState::sign(&state, &other);
        forged.key_id = cp.public().id();
        assert_eq!(
            forged.open(&cp.public()),
            Err(DesiredStateError::BadSignature)
        );

        let mut tampered = signed.clone();
        tampered.state[3] ^= 1;
        assert_eq!(
            tampered.open(&cp.public()),
            Err(DesiredStateError::BadSignature)
        );
    }

    #[test]
    fn a_state_signed_by_the_newest_and_earlier_keys_opens_with_any_of_them() {
        let (first, newest, stranger) = (
            SecretKey::from_seed([5; 32]),
            SecretKey::from_seed([7; 32]),
            SecretKey::from_seed([8; 32]),
        );
        let state = DesiredState {
            agent: "edge-1".into(),
            generation: 4,
            bundle: None,
            rollout: None,
            issued_at_ms: 1,
            key_sets: vec![],
        };
        let signed = SignedDesiredState::sign_all(&state, &newest, &[&first]);
        assert_eq!(signed.open(&newest.public()).unwrap(), state);
        assert_eq!(signed.open(&first.public()).unwrap(), state);
        assert!(matches!(
            signed.open(&stranger.public()),
            Err(DesiredStateError::UnknownKey(_))
        ));
        let mut forged = signed.clone();
        forged.also[0].signature[0] ^= 1;
        assert_eq!(
            forged.open(&first.public()),
            Err(DesiredStateError::BadSignature)
        );
        assert_eq!(forged.open(&newest.public()).unwrap(), state);
    }

    #[test]
    fn histogram_quantiles_interpolate_within_buckets() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for _ in 0..90 {
            h.observe(4.0); // bucket (3, 5]
        }
        for _ in 0..10 {
            h.observe(80.0); // bucket (50, 100]
        }
        let p50 = h.quantile(0.5).unwrap();
        assert!((3.0..=5.0).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((50.0..=100.0).contains(&p99), "{p99}");
        assert_eq!(h.count(), 100);

        let earlier = h.clone();
        h.observe(2000.0);
        let window = h.since(&earlier);
        assert_eq!(window.count(), 1);
        assert!(window.quantile(0.99).unwrap() > 1000.0);
    }

    #[test]
    fn a_control_plane_state_older_than_the_newest_is_stale() {
        let online = |epoch| ControlPlaneState {
            online: true,
            epoch,
        };
        let will = |epoch| ControlPlaneState {
            online: false,
            epoch,
        };
        assert!(online(5).supersedes(None));
        assert!(will(5).supersedes(Some(&online(5))), "its own will");
        assert!(
            !will(4).supersedes(Some(&online(5))),
            "a late will of an earlier process"
        );
        assert!(
            online(6).supersedes(Some(&will(5))),
            "a restarted control plane"
        );
        assert!(
            online(4).supersedes(Some(&will(5))),
            "its clock stepped back"
        );
    }

    #[test]
    fn stale_will_is_recognisable_by_session() {
        let will = Presence::Offline { session: 3 };
        assert_eq!(will.session(), 3);
    }
}
