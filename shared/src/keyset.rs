//! Key sets: replacing the publisher keys a fleet trusts without touching each device.
//!
//! A holder (an agent, the control plane) starts from the publisher keys and threshold in its
//! configuration, which are key set 1 unless configured otherwise. Key set N+1 replaces N only
//! when a threshold of N's keys *and* a threshold of its own keys signed it, the rule TUF uses
//! for its root role: new keys cannot vouch for themselves, and moving trust takes as many of
//! the trusted keys as signing a bundle does. Sets apply one version at a time, so
//! a holder that missed some follows the chain of them ([`TrustedKeys::follow`]), checking each
//! against the one before.
//!
//! A key set can also lower the sequence floors of named models. That is the way back from a
//! fast-forward attack, in which a stolen key signed a release numbered so high that no honest
//! release could follow it: the set that retires the stolen key resets the floors it pushed up.
//!
//! A key set can name a new control-plane key too: the key agents require on desired states
//! from that set on. The publisher keys vouch for it, so a stolen control-plane key is retired
//! the same way as a stolen publisher key.
//!
//! Signatures cover [`SIGNING_CONTEXT`] followed by the set's CBOR, so no signature over a
//! key set can pass for one over a manifest or a desired state, nor the other way round.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::bundle::Signature;
use crate::digest::Sha256Digest;
use crate::keys::{KeyId, PublicKey, SecretKey};
use crate::verify::{check_model_name, signers, Signers, Verifier};

/// Layout version of [`KeySet`]; holders refuse others.
pub const KEY_SET_FORMAT_VERSION: u32 = 1;

/// Largest signed key set accepted, so a hostile message cannot make a reader allocate wildly.
pub const MAX_KEY_SET_BYTES: usize = 64 * 1024;

/// Largest chain of key sets (their encoded bytes together) a control plane hands out: every
/// desired state carries the whole chain, and agents take MQTT packets of at most 1 MiB.
pub const MAX_CHAIN_BYTES: usize = 256 * 1024;

/// What every key-set signature covers before the set's CBOR.
pub const SIGNING_CONTEXT: &[u8] = b"flotilla/v1 key set\n";

/// The publisher keys trusted from one version on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySet {
    /// [`KEY_SET_FORMAT_VERSION`].
    pub format_version: u32,
    /// Position in the chain: one above the set it replaces.
    pub version: u64,
    /// Keys whose signatures count on bundles (and on the next key set).
    pub publishers: Vec<PublicKey>,
    /// Distinct publisher signatures a bundle needs.
    pub threshold: u32,
    /// The control plane's key from this set on; `None` keeps the one trusted before.
    pub control_plane: Option<PublicKey>,
    /// Models whose sequence floor becomes exactly this value (lower or higher) when the set
    /// is applied; every other floor stays.
    pub reset_floors: BTreeMap<String, u64>,
    /// When it was made, Unix seconds; for people, not checked.
    pub issued_at: u64,
}

/// A key set with the signatures over its exact CBOR bytes: the file operators pass around and
/// what the control plane publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedKeySet {
    /// The version the body claims, outside the signature, so a holder can tell which sets
    /// are new and which keys must have signed before it decodes anything; checked against
    /// the body once the signatures verified.
    pub version: u64,
    /// CBOR of a [`KeySet`].
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Signatures over [`SIGNING_CONTEXT`] and `body`.
    pub signatures: Vec<Signature>,
}

/// Why a key set was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeySetError {
    /// Not a signed key set, or its body is not a key set.
    #[error("malformed key set: {0}")]
    Malformed(String),
    /// Made for a layout this build does not understand.
    #[error("key set {version}: unsupported format version {format}")]
    UnsupportedFormat {
        /// The set's version.
        version: u64,
        /// Declared format.
        format: u32,
    },
    /// The set contradicts itself (no keys, a threshold it cannot meet, a bad model name).
    #[error("key set {version} is invalid: {reason}")]
    Invalid {
        /// The set's version.
        version: u64,
        /// What is wrong.
        reason: String,
    },
    /// Already trusted, or older: nothing to apply.
    #[error("key set {version} is not newer than the trusted key set {current}")]
    NotNewer {
        /// The set's version.
        version: u64,
        /// Version trusted now.
        current: u64,
    },
    /// One or more versions in between are missing.
    #[error(
        "key set {version} cannot follow the trusted key set {current}: key set {} is missing",
        .current + 1
    )]
    Skips {
        /// The set's version.
        version: u64,
        /// Version trusted now.
        current: u64,
    },
    /// A signature by a key that counts does not verify: the set or the signature was altered.
    #[error("key set {version}: signature by key {key_id} does not verify")]
    SignatureInvalid {
        /// The set's version.
        version: u64,
        /// Whose signature failed.
        key_id: KeyId,
    },
    /// Too few distinct keys of the named set signed.
    #[error(
        "key set {version}: {valid} distinct signature(s) by keys of key set {by}, {required} required{}",
        if *.repeated > 0 { format!(" ({} repeated signature(s) not counted)", .repeated) } else { String::new() }
    )]
    ThresholdNotMet {
        /// The set's version.
        version: u64,
        /// The set whose keys had to sign: the trusted one, or the new one itself.
        by: u64,
        /// Distinct valid signatures by its keys.
        valid: usize,
        /// Its threshold.
        required: usize,
        /// Extra signatures by keys already counted.
        repeated: usize,
    },
}

impl KeySet {
    /// A set of `publishers` needing `threshold` of them, as `version`.
    pub fn new(version: u64, publishers: Vec<PublicKey>, threshold: u32, issued_at: u64) -> Self {
        Self {
            format_version: KEY_SET_FORMAT_VERSION,
            version,
            publishers,
            threshold,
            control_plane: None,
            reset_floors: BTreeMap::new(),
            issued_at,
        }
    }
}

impl SignedKeySet {
    /// An unsigned envelope for `set`.
    pub fn new(set: &KeySet) -> Self {
        Self {
            version: set.version,
            body: serde_cbor::to_vec(set).expect("invariant: key sets always encode as CBOR"),
            signatures: Vec::new(),
        }
    }

    /// Decodes a signed key set (a file, an upload), refusing oversized input.
    pub fn decode(bytes: &[u8]) -> Result<Self, KeySetError> {
        if bytes.len() > MAX_KEY_SET_BYTES {
            return Err(KeySetError::Malformed(format!(
                "{} bytes, over the {MAX_KEY_SET_BYTES} byte limit",
                bytes.len()
            )));
        }
        serde_cbor::from_slice(bytes).map_err(|e| KeySetError::Malformed(e.to_string()))
    }

    /// CBOR bytes, as [`SignedKeySet::decode`] reads them.
    pub fn encode(&self) -> Vec<u8> {
        serde_cbor::to_vec(self).expect("invariant: key sets always encode as CBOR")
    }

    /// SHA-256 of the body: which set of its version this is. Two sets of one version with
    /// different digests are two chains, a fork; agents report it so forks show.
    pub fn digest(&self) -> Sha256Digest {
        Sha256Digest::of(&self.body)
    }

    /// The set, decoded but not checked: to show it, or to learn which version it claims.
    pub fn key_set(&self) -> Result<KeySet, KeySetError> {
        serde_cbor::from_slice(&self.body).map_err(|e| KeySetError::Malformed(e.to_string()))
    }

    /// Signs with `key` unless that key has signed already; returns whether it added one.
    pub fn add_signature(&mut self, key: &SecretKey) -> bool {
        let key_id = key.public().id();
        if self.signatures.iter().any(|s| s.key_id == key_id) {
            return false;
        }
        let signature = key.sign(&signed_message(&self.body)).to_vec();
        self.signatures.push(Signature { key_id, signature });
        true
    }
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    [SIGNING_CONTEXT, body].concat()
}

/// The publisher keys a holder trusts now, and the key set version they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKeys {
    version: u64,
    publishers: Vec<PublicKey>,
    threshold: usize,
}

/// A key set that followed the trusted one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The keys trusted from now on.
    pub keys: TrustedKeys,
    /// The set as signed.
    pub set: KeySet,
    /// The signed form, to keep and pass on.
    pub signed: SignedKeySet,
    /// Keys of the previous set whose signatures counted, sorted.
    pub signed_by: Vec<KeyId>,
}

/// What following a chain of key sets came to.
#[derive(Debug, Default)]
pub struct Followed {
    /// The sets applied, in order; the last one's keys are trusted now.
    pub accepted: Vec<Accepted>,
    /// Why the chain stopped before its end, if it did.
    pub refused: Option<KeySetError>,
}

impl TrustedKeys {
    /// `publishers` as key set `version`, needing `threshold` distinct signatures. A key listed
    /// twice counts once.
    pub fn new(
        version: u64,
        publishers: Vec<PublicKey>,
        threshold: usize,
    ) -> Result<Self, KeySetError> {
        let mut distinct: Vec<PublicKey> = Vec::with_capacity(publishers.len());
        for key in publishers {
            if !distinct.contains(&key) {
                distinct.push(key);
            }
        }
        let invalid = |reason: String| KeySetError::Invalid { version, reason };
        if distinct.is_empty() {
            return Err(invalid("it lists no publisher key".into()));
        }
        if threshold == 0 {
            return Err(invalid("the threshold must be at least 1".into()));
        }
        if threshold > distinct.len() {
            return Err(invalid(format!(
                "the threshold {threshold} exceeds its {} distinct key(s)",
                distinct.len()
            )));
        }
        Ok(Self {
            version,
            publishers: distinct,
            threshold,
        })
    }

    /// The key set version these keys are.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The trusted publisher keys.
    pub fn publishers(&self) -> &[PublicKey] {
        &self.publishers
    }

    /// Distinct signatures a bundle needs.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Whether bundles signed by `signed_by` meet these keys' threshold.
    pub fn accepts_signers(&self, signed_by: &[KeyId]) -> bool {
        let trusted = signed_by
            .iter()
            .filter(|id| self.publishers.iter().any(|k| k.id() == **id))
            .collect::<std::collections::BTreeSet<_>>();
        trusted.len() >= self.threshold
    }

    /// A bundle verifier for these keys at `now` (Unix seconds).
    pub fn verifier(&self, now: u64) -> Verifier {
        Verifier::new(&self.publishers, self.threshold, now)
            .expect("invariant: TrustedKeys::new checked the threshold against the keys")
    }

    /// Checks `signed` as the set that follows these keys: the next version, signed by a
    /// threshold of these keys and a threshold of its own, and valid in itself. The body is
    /// decoded only once these keys' signatures over it verified.
    pub fn next(&self, signed: &SignedKeySet) -> Result<Accepted, KeySetError> {
        let version = signed.version;
        if version <= self.version {
            return Err(KeySetError::NotNewer {
                version,
                current: self.version,
            });
        }
        if version > self.version + 1 {
            return Err(KeySetError::Skips {
                version,
                current: self.version,
            });
        }
        let message = signed_message(&signed.body);
        let signed_by = self.count(version, &message, signed)?;

        let set = signed.key_set()?;
        if set.version != version {
            return Err(KeySetError::Malformed(format!(
                "key set {version} holds key set {}",
                set.version
            )));
        }
        if set.format_version != KEY_SET_FORMAT_VERSION {
            return Err(KeySetError::UnsupportedFormat {
                version,
                format: set.format_version,
            });
        }
        let threshold = usize::try_from(set.threshold).unwrap_or(usize::MAX);
        let keys = TrustedKeys::new(version, set.publishers.clone(), threshold)?;
        keys.count(version, &message, signed)?;
        if let Some(key) = &set.control_plane {
            if keys.publishers.contains(key) {
                return Err(KeySetError::Invalid {
                    version,
                    reason: format!(
                        "control-plane key {} is also a publisher key; the two roles need separate keys",
                        key.id()
                    ),
                });
            }
        }
        for name in set.reset_floors.keys() {
            check_model_name(name).map_err(|reason| KeySetError::Invalid {
                version,
                reason: format!("reset_floors: {reason}"),
            })?;
        }
        Ok(Accepted {
            keys,
            set,
            signed: signed.clone(),
            signed_by,
        })
    }

    /// Follows `chain` from these keys: sets not newer than the trusted one are skipped (a
    /// holder is sent the whole chain), each newer one must follow the one before.
    pub fn follow(&self, chain: &[SignedKeySet]) -> Followed {
        let mut ordered: Vec<&SignedKeySet> = chain.iter().collect();
        ordered.sort_by_key(|signed| signed.version);

        let mut followed = Followed::default();
        let mut current = self.clone();
        for signed in ordered {
            if signed.version <= current.version {
                continue;
            }
            match current.next(signed) {
                Ok(accepted) => {
                    current = accepted.keys.clone();
                    followed.accepted.push(accepted);
                }
                Err(e) => {
                    followed.refused = Some(e);
                    break;
                }
            }
        }
        followed
    }

    /// Distinct keys of this set that signed `message`, if they meet its threshold.
    fn count(
        &self,
        version: u64,
        message: &[u8],
        signed: &SignedKeySet,
    ) -> Result<Vec<KeyId>, KeySetError> {
        let trusted: HashMap<KeyId, PublicKey> =
            self.publishers.iter().map(|k| (k.id(), *k)).collect();
        let Signers {
            valid, repeated, ..
        } = signers(&trusted, message, &signed.signatures)
            .map_err(|key_id| KeySetError::SignatureInvalid { version, key_id })?;
        if valid.len() < self.threshold {
            return Err(KeySetError::ThresholdNotMet {
                version,
                by: self.version,
                valid: valid.len(),
                required: self.threshold,
                repeated,
            });
        }
        Ok(valid.into_iter().collect())
    }
}
