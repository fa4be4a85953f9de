//! Bundle verification: signatures, freshness, anti-rollback, host fit and payload integrity.
//!
//! Order matters. Signatures are checked over the raw manifest bytes before the manifest is
//! decoded, so nothing untrusted is interpreted beyond the container framing. Each way a bundle
//! can be wrong has its own [`VerifyError`] variant, and no input makes the verifier panic.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::bundle::{decode_manifest, payload_entries, Bundle, BundleError};
use crate::digest::Sha256Digest;
use crate::keys::{KeyId, PublicKey};
use crate::manifest::{
    Backend, Manifest, Task, MANIFEST_FORMAT_VERSION, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
};

/// Everything that can make a bundle unacceptable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerifyError {
    /// The verifier itself is misconfigured.
    #[error("verifier configuration: {0}")]
    Config(String),
    /// The container framing or CBOR is broken.
    #[error(transparent)]
    Container(#[from] BundleError),
    /// The bundle carries no signature at all.
    #[error("bundle {digest} is unsigned")]
    Unsigned {
        /// Bundle digest.
        digest: Sha256Digest,
    },
    /// A signature by a trusted key does not verify: the manifest or signature was altered.
    #[error("bundle {digest}: signature by key {key_id} does not verify")]
    SignatureInvalid {
        /// Bundle digest.
        digest: Sha256Digest,
        /// The trusted key whose signature failed.
        key_id: KeyId,
    },
    /// No signature comes from a trusted key.
    #[error("bundle {digest} is signed only by unknown keys ({key_ids})")]
    UnknownKey {
        /// Bundle digest.
        digest: Sha256Digest,
        /// The untrusted key ids, comma-separated.
        key_ids: String,
    },
    /// Too few distinct trusted keys signed.
    #[error(
        "bundle {digest}: {valid} distinct trusted signature(s), {required} required{}",
        if *.repeated > 0 { format!(" ({} repeated signature(s) not counted)", .repeated) } else { String::new() }
    )]
    ThresholdNotMet {
        /// Bundle digest.
        digest: Sha256Digest,
        /// Distinct trusted keys with a valid signature.
        valid: usize,
        /// Threshold.
        required: usize,
        /// Extra signatures by keys already counted.
        repeated: usize,
    },
    /// The manifest declares a layout this build does not understand.
    #[error("bundle {digest}: unsupported manifest format version {version}")]
    UnsupportedFormat {
        /// Bundle digest.
        digest: Sha256Digest,
        /// Declared version.
        version: u32,
    },
    /// The manifest contradicts itself or breaks a format rule.
    #[error("bundle {digest}: invalid manifest: {reason}")]
    InvalidManifest {
        /// Bundle digest.
        digest: Sha256Digest,
        /// What is wrong.
        reason: String,
    },
    /// A payload path could escape the install directory or is otherwise unsafe.
    #[error("bundle {digest}: unsafe payload path {path:?}: {reason}")]
    UnsafePath {
        /// Bundle digest.
        digest: Sha256Digest,
        /// Offending path.
        path: String,
        /// Why it is unsafe.
        reason: &'static str,
    },
    /// A payload path appears twice.
    #[error("bundle {digest}: payload path {path:?} appears more than once")]
    DuplicatePath {
        /// Bundle digest.
        digest: Sha256Digest,
        /// Repeated path.
        path: String,
    },
    /// The bundle's validity ended.
    #[error("bundle {digest} expired at {expires_at} (now {now})")]
    Expired {
        /// Bundle digest.
        digest: Sha256Digest,
        /// Expiry, Unix seconds.
        expires_at: u64,
        /// Verifier's clock, Unix seconds.
        now: u64,
    },
    /// The release counter does not exceed the highest one already accepted.
    #[error("bundle {digest}: sequence {sequence} of {name} is not above the floor {floor}")]
    SequenceNotAboveFloor {
        /// Bundle digest.
        digest: Sha256Digest,
        /// Model name.
        name: String,
        /// Bundle's sequence number.
        sequence: u64,
        /// Highest sequence accepted before.
        floor: u64,
    },
    /// The host's CPU architecture is not among those the bundle supports.
    #[error("bundle {digest} supports architectures [{supported}], this host is {host}")]
    ArchitectureUnsupported {
        /// Bundle digest.
        digest: Sha256Digest,
        /// Supported architectures, comma-separated.
        supported: String,
        /// Host architecture.
        host: String,
    },
    /// No backend the bundle allows is available on the host.
    #[error("bundle {digest} runs on [{supported}], this host offers [{available}]")]
    NoUsableBackend {
        /// Bundle digest.
        digest: Sha256Digest,
        /// Backends the bundle allows, comma-separated.
        supported: String,
        /// Backends on the host, comma-separated.
        available: String,
    },
    /// The bundle needs an accelerator the host lacks.
    #[error("bundle {digest} needs an accelerator and this host has none")]
    AcceleratorRequired {
        /// Bundle digest.
        digest: Sha256Digest,
    },
    /// The agent is older than the bundle requires.
    #[error("bundle {digest} needs agent {required} or newer, this is {actual}")]
    AgentTooOld {
        /// Bundle digest.
        digest: Sha256Digest,
        /// Minimum version.
        required: semver::Version,
        /// This agent's version.
        actual: semver::Version,
    },
    /// The payload section is shorter than the manifest declares.
    #[error("bundle {digest}: payload truncated: {actual} of {declared} bytes")]
    PayloadTruncated {
        /// Bundle digest.
        digest: Sha256Digest,
        /// Declared size.
        declared: u64,
        /// Bytes present.
        actual: u64,
    },
    /// Bytes follow the declared payload.
    #[error("bundle {digest}: {extra} unexpected bytes after the {declared}-byte payload")]
    TrailingData {
        /// Bundle digest.
        digest: Sha256Digest,
        /// Declared size.
        declared: u64,
        /// Extra bytes.
        extra: u64,
    },
    /// A payload chunk does not hash to the value the manifest lists.
    #[error("bundle {digest}: chunk {index} does not match its hash")]
    ChunkDigestMismatch {
        /// Bundle digest.
        digest: Sha256Digest,
        /// Chunk index.
        index: usize,
    },
    /// A file the manifest lists is not in the payload.
    #[error("bundle {digest}: listed file {path:?} is missing from the payload")]
    FileMissing {
        /// Bundle digest.
        digest: Sha256Digest,
        /// Listed path.
        path: String,
    },
    /// The payload carries a file the manifest does not list.
    #[error("bundle {digest}: payload carries unlisted file {path:?}")]
    UnlistedFile {
        /// Bundle digest.
        digest: Sha256Digest,
        /// Unlisted path.
        path: String,
    },
    /// A file's length differs from the manifest.
    #[error("bundle {digest}: file {path:?} is {actual} bytes, the manifest says {listed}")]
    SizeMismatch {
        /// Bundle digest.
        digest: Sha256Digest,
        /// Path.
        path: String,
        /// Listed size.
        listed: u64,
        /// Actual size.
        actual: u64,
    },
    /// A file's contents do not hash to the listed value.
    #[error("bundle {digest}: file {path:?} does not match its hash")]
    FileDigestMismatch {
        /// Bundle digest.
        digest: Sha256Digest,
        /// Path.
        path: String,
    },
}

/// What a host offers, checked against a bundle's requirements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProfile {
    /// CPU architecture, as `std::env::consts::ARCH` names it.
    pub architecture: String,
    /// Backends that can run models here.
    pub backends: Vec<Backend>,
    /// Whether an accelerator is present and usable.
    pub accelerator: bool,
    /// Version of the agent doing the checking.
    pub agent_version: semver::Version,
}

/// A bundle whose manifest passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedBundle {
    /// SHA-256 of the manifest bytes.
    pub digest: Sha256Digest,
    /// The decoded, checked manifest.
    pub manifest: Manifest,
    /// Trusted keys whose signatures verified, sorted.
    pub signed_by: Vec<KeyId>,
}

/// Checks bundles against a set of trusted keys and the caller's view of time and host.
#[derive(Debug, Clone)]
pub struct Verifier {
    trusted: HashMap<KeyId, PublicKey>,
    threshold: usize,
    now: u64,
    sequence_floor: Option<u64>,
    host: Option<HostProfile>,
}

impl Verifier {
    /// A verifier that needs `threshold` distinct keys out of `trusted`, at time `now` (Unix
    /// seconds). By default it checks no sequence floor and no host requirements.
    pub fn new(trusted: &[PublicKey], threshold: usize, now: u64) -> Result<Self, VerifyError> {
        let trusted: HashMap<KeyId, PublicKey> = trusted.iter().map(|k| (k.id(), *k)).collect();
        if threshold == 0 {
            return Err(VerifyError::Config("threshold must be at least 1".into()));
        }
        if threshold > trusted.len() {
            return Err(VerifyError::Config(format!(
                "threshold {threshold} exceeds the {} distinct trusted key(s)",
                trusted.len()
            )));
        }
        Ok(Self {
            trusted,
            threshold,
            now,
            sequence_floor: None,
            host: None,
        })
    }

    /// Requires the bundle's sequence number to be strictly above `floor`.
    pub fn sequence_floor(mut self, floor: u64) -> Self {
        self.sequence_floor = Some(floor);
        self
    }

    /// Checks the bundle's requirements against `host`.
    pub fn host(mut self, host: HostProfile) -> Self {
        self.host = Some(host);
        self
    }

    /// Verifies a whole bundle: header checks, then every payload byte.
    pub fn verify(&self, data: &[u8]) -> Result<VerifiedBundle, VerifyError> {
        let bundle = Bundle::parse(data)?;
        let verified = self.verify_parsed_header(bundle.manifest_bytes, &bundle.signatures)?;
        verify_payload(&verified.digest, &verified.manifest, bundle.payload)?;
        Ok(verified)
    }

    /// Verifies the header alone (the container up to the payload), as an agent does before it
    /// downloads any chunk. Bytes after the header are ignored.
    pub fn verify_header(&self, data: &[u8]) -> Result<VerifiedBundle, VerifyError> {
        let (manifest_bytes, signatures, _) = Bundle::parse_header(data)?;
        self.verify_parsed_header(manifest_bytes, &signatures)
    }

    fn verify_parsed_header(
        &self,
        manifest_bytes: &[u8],
        signatures: &[crate::bundle::Signature],
    ) -> Result<VerifiedBundle, VerifyError> {
        let digest = Sha256Digest::of(manifest_bytes);
        let signed_by = self.check_signatures(&digest, manifest_bytes, signatures)?;

        let manifest = decode_manifest(manifest_bytes)?;
        check_manifest(&digest, &manifest)?;

        if self.now > manifest.expires_at {
            return Err(VerifyError::Expired {
                digest,
                expires_at: manifest.expires_at,
                now: self.now,
            });
        }
        if let Some(floor) = self.sequence_floor {
            if manifest.sequence <= floor {
                return Err(VerifyError::SequenceNotAboveFloor {
                    digest,
                    name: manifest.name.clone(),
                    sequence: manifest.sequence,
                    floor,
                });
            }
        }
        if let Some(host) = &self.host {
            check_host(&digest, &manifest, host)?;
        }

        Ok(VerifiedBundle {
            digest,
            manifest,
            signed_by,
        })
    }

    fn check_signatures(
        &self,
        digest: &Sha256Digest,
        manifest_bytes: &[u8],
        signatures: &[crate::bundle::Signature],
    ) -> Result<Vec<KeyId>, VerifyError> {
        if signatures.is_empty() {
            return Err(VerifyError::Unsigned { digest: *digest });
        }

        let Signers {
            valid,
            unknown,
            repeated,
        } = signers(&self.trusted, manifest_bytes, signatures).map_err(|key_id| {
            VerifyError::SignatureInvalid {
                digest: *digest,
                key_id,
            }
        })?;

        if valid.len() >= self.threshold {
            return Ok(valid.into_iter().collect());
        }
        if valid.is_empty() && repeated == 0 && !unknown.is_empty() {
            let key_ids: Vec<String> = unknown.iter().map(KeyId::to_string).collect();
            return Err(VerifyError::UnknownKey {
                digest: *digest,
                key_ids: key_ids.join(", "),
            });
        }
        Err(VerifyError::ThresholdNotMet {
            digest: *digest,
            valid: valid.len(),
            required: self.threshold,
            repeated,
        })
    }
}

/// Whose signatures over a message count, as [`signers`] finds them.
#[derive(Debug, Default)]
pub(crate) struct Signers {
    /// Distinct trusted keys whose signature verified.
    pub valid: BTreeSet<KeyId>,
    /// Keys that signed but are not trusted.
    pub unknown: Vec<KeyId>,
    /// Further signatures by keys already counted.
    pub repeated: usize,
}

/// Checks each signature by a trusted key strictly over `message`. Signatures by other keys
/// are listed, not checked; a trusted key's signature that does not verify is an error naming
/// the key, since it means the message or the signature was altered.
pub(crate) fn signers(
    trusted: &HashMap<KeyId, PublicKey>,
    message: &[u8],
    signatures: &[crate::bundle::Signature],
) -> Result<Signers, KeyId> {
    let mut found = Signers::default();
    for sig in signatures {
        let Some(key) = trusted.get(&sig.key_id) else {
            found.unknown.push(sig.key_id);
            continue;
        };
        if !key.verify_strict_bytes(message, &sig.signature) {
            return Err(sig.key_id);
        }
        if !found.valid.insert(sig.key_id) {
            found.repeated += 1;
        }
    }
    Ok(found)
}

/// Format rules every manifest must satisfy, independent of host and time.
pub fn check_manifest(digest: &Sha256Digest, m: &Manifest) -> Result<(), VerifyError> {
    let invalid = |reason: String| VerifyError::InvalidManifest {
        digest: *digest,
        reason,
    };

    if m.format_version != MANIFEST_FORMAT_VERSION {
        return Err(VerifyError::UnsupportedFormat {
            digest: *digest,
            version: m.format_version,
        });
    }
    if let Err(reason) = check_model_name(&m.name) {
        return Err(invalid(reason));
    }
    if m.created_at > m.expires_at {
        return Err(invalid(format!(
            "created_at {} is after expires_at {}",
            m.created_at, m.expires_at
        )));
    }
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&m.chunk_size) {
        return Err(invalid(format!(
            "chunk size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
            m.chunk_size
        )));
    }
    let expected_chunks = Manifest::expected_chunk_count(m.payload_size, m.chunk_size);
    if m.chunks.len() as u64 != expected_chunks {
        return Err(invalid(format!(
            "{} chunk hashes listed, a {}-byte payload has {expected_chunks}",
            m.chunks.len(),
            m.payload_size
        )));
    }
    if m.files.is_empty() {
        return Err(invalid("no payload files".into()));
    }

    let mut seen = HashSet::new();
    for file in &m.files {
        if file.path.len() > crate::bundle::MAX_PATH_BYTES {
            return Err(VerifyError::UnsafePath {
                digest: *digest,
                path: file.path.clone(),
                reason: "path longer than 255 bytes",
            });
        }
        if let Err(reason) = check_path(&file.path) {
            return Err(VerifyError::UnsafePath {
                digest: *digest,
                path: file.path.clone(),
                reason,
            });
        }
        if !seen.insert(file.path.as_str()) {
            return Err(VerifyError::DuplicatePath {
                digest: *digest,
                path: file.path.clone(),
            });
        }
    }

    if m.file(&m.model.entry).is_none() {
        return Err(invalid(format!(
            "model entry {:?} is not a payload file",
            m.model.entry
        )));
    }
    let is_text_task = m.model.task != Task::Raw;
    match (&m.model.text, is_text_task) {
        (Some(text), true) => {
            if m.file(&text.tokenizer).is_none() {
                return Err(invalid(format!(
                    "tokenizer {:?} is not a payload file",
                    text.tokenizer
                )));
            }
            if text.max_sequence_length < 2 {
                return Err(invalid("max_sequence_length must be at least 2".into()));
            }
        }
        (None, true) => {
            return Err(invalid(format!(
                "{} task needs text settings",
                m.model.task
            )))
        }
        (Some(_), false) => return Err(invalid("raw task must not carry text settings".into())),
        (None, false) => {}
    }
    let is_classifier = m.model.task == Task::Classification;
    if is_classifier == m.model.labels.is_empty() {
        return Err(invalid(
            "labels are required for classification and only there".into(),
        ));
    }
    if m.requirements.backends.is_empty() {
        return Err(invalid("requirements list no backend".into()));
    }
    for test in &m.self_tests {
        if !(test.tolerance.is_finite() && test.tolerance >= 0.0) {
            return Err(invalid(format!(
                "self-test {:?} has an invalid tolerance",
                test.name
            )));
        }
        if test.expected.is_empty() {
            return Err(invalid(format!(
                "self-test {:?} expects nothing",
                test.name
            )));
        }
    }
    Ok(())
}

/// Model names: `[a-z0-9][a-z0-9._-]*`, 1 to 64 characters; safe in topics, paths and URLs.
pub fn check_model_name(name: &str) -> Result<(), String> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    let valid_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 64 || !valid_chars || !valid_start {
        return Err(format!(
            "model name {name:?} must match [a-z0-9][a-z0-9._-]{{0,63}}"
        ));
    }
    Ok(())
}

/// Payload paths are relative, `/`-separated, and have only normal components.
fn check_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("empty path");
    }
    if path.starts_with('/') {
        return Err("absolute path");
    }
    if path.contains('\\') || path.contains('\0') || path.contains(':') {
        return Err("backslash, colon or NUL in path");
    }
    for component in path.split('/') {
        match component {
            ".." => return Err("parent-directory component"),
            "" | "." => return Err("empty or '.' component"),
            _ => {}
        }
    }
    Ok(())
}

fn check_host(digest: &Sha256Digest, m: &Manifest, host: &HostProfile) -> Result<(), VerifyError> {
    let req = &m.requirements;
    if !req.architectures.is_empty() && !req.architectures.contains(&host.architecture) {
        return Err(VerifyError::ArchitectureUnsupported {
            digest: *digest,
            supported: req.architectures.join(", "),
            host: host.architecture.clone(),
        });
    }
    if !req.backends.iter().any(|b| host.backends.contains(b)) {
        let list = |v: &[Backend]| {
            v.iter()
                .map(Backend::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(VerifyError::NoUsableBackend {
            digest: *digest,
            supported: list(&req.backends),
            available: list(&host.backends),
        });
    }
    if req.accelerator && !host.accelerator {
        return Err(VerifyError::AcceleratorRequired { digest: *digest });
    }
    if let Some(required) = &req.min_agent_version {
        if host.agent_version < *required {
            return Err(VerifyError::AgentTooOld {
                digest: *digest,
                required: required.clone(),
                actual: host.agent_version.clone(),
            });
        }
    }
    Ok(())
}

/// Checks a payload against a verified manifest: size, every chunk hash, then every file.
pub fn verify_payload(
    digest: &Sha256Digest,
    manifest: &Manifest,
    payload: &[u8],
) -> Result<(), VerifyError> {
    let actual = payload.len() as u64;
    if actual < manifest.payload_size {
        return Err(VerifyError::PayloadTruncated {
            digest: *digest,
            declared: manifest.payload_size,
            actual,
        });
    }
    if actual > manifest.payload_size {
        return Err(VerifyError::TrailingData {
            digest: *digest,
            declared: manifest.payload_size,
            extra: actual - manifest.payload_size,
        });
    }

    for (index, expected) in manifest.chunks.iter().enumerate() {
        if !chunk_matches(manifest, index, expected, payload) {
            return Err(VerifyError::ChunkDigestMismatch {
                digest: *digest,
                index,
            });
        }
    }

    let listed: HashMap<&str, &crate::manifest::FileEntry> = manifest
        .files
        .iter()
        .map(|f| (f.path.as_str(), f))
        .collect();
    let mut found = HashSet::new();
    for entry in payload_entries(payload)? {
        let Some(file) = listed.get(entry.path) else {
            return Err(VerifyError::UnlistedFile {
                digest: *digest,
                path: entry.path.to_owned(),
            });
        };
        if !found.insert(entry.path) {
            return Err(VerifyError::DuplicatePath {
                digest: *digest,
                path: entry.path.to_owned(),
            });
        }
        if entry.data.len() as u64 != file.size {
            return Err(VerifyError::SizeMismatch {
                digest: *digest,
                path: file.path.clone(),
                listed: file.size,
                actual: entry.data.len() as u64,
            });
        }
        if Sha256Digest::of(entry.data) != file.sha256 {
            return Err(VerifyError::FileDigestMismatch {
                digest: *digest,
                path: file.path.clone(),
            });
        }
    }
    if let Some(missing) = manifest
        .files
        .iter()
        .find(|f| !found.contains(f.path.as_str()))
    {
        return Err(VerifyError::FileMissing {
            digest: *digest,
            path: missing.path.clone(),
        });
    }
    Ok(())
}

fn chunk_matches(m: &Manifest, index: usize, expected: &Sha256Digest, payload: &[u8]) -> bool {
    let Some(range) = m.chunk_range(index) else {
        return false;
    };
    payload
        .get(range.start as usize..range.end as usize)
        .is_some_and(|chunk| Sha256Digest::of(chunk) == *expected)
}

/// Checks one received chunk against the manifest, as a downloader does on arrival.
pub fn chunk_is_valid(manifest: &Manifest, index: usize, data: &[u8]) -> bool {
    let Some(range) = manifest.chunk_range(index) else {
        return false;
    };
    let right_length = data.len() as u64 == range.end - range.start;
    right_length
        && manifest
            .chunks
            .get(index)
            .is_some_and(|d| Sha256Digest::of(data) == *d)
}
