//! Turning bundle bytes into a serving model: verify, keep, extract, load, self-test, activate.
//!
//! Each step either completes or leaves the previous state untouched: bundle files and extracted
//! folders are written under temporary names and renamed into place, and the active bundle is
//! recorded in sled only after its model loaded and passed every self-test. After a crash the
//! agent therefore restarts on a complete, verified model, old or new.
//!
//! Everything here blocks (hashing, file writes, model optimisation); async callers use
//! `spawn_blocking`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use flotilla_shared::bundle::payload_entries;
use flotilla_shared::keyset::Followed;
use flotilla_shared::manifest::{Backend, Manifest};
use flotilla_shared::{
    Bundle, HostProfile, KeySetError, PublicKey, Sha256Digest, SignedKeySet, TrustedKeys,
    VerifiedBundle, Verifier,
};
use tracing::{info, warn};

use crate::runtime::{selftest, Model, Placement};
use crate::serving::{ModelSlot, ServedModel};
use crate::store::Store;

/// The install step that failed, as reported to the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Fetching chunks.
    Download,
    /// Signature, expiry, sequence, requirements or payload checks.
    Verify,
    /// Writing, extracting or loading.
    Stage,
    /// A self-test vector did not match.
    SelfTest,
    /// Recording or switching.
    Activate,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Download => "download",
            Self::Verify => "verify",
            Self::Stage => "stage",
            Self::SelfTest => "self_test",
            Self::Activate => "activate",
        })
    }
}

/// An install that stopped, and why; the previous model keeps serving.
#[derive(Debug, Clone, thiserror::Error)]
#[error("install failed at {stage}: {reason}")]
pub struct InstallError {
    /// Step that failed.
    pub stage: Stage,
    /// Why.
    pub reason: String,
}

impl InstallError {
    /// Builds an error for `stage` from anything displayable.
    pub fn at(stage: Stage, reason: impl fmt::Display) -> Self {
        Self {
            stage,
            reason: reason.to_string(),
        }
    }
}

/// Keys and thresholds the agent trusts.
#[derive(Debug, Clone)]
pub struct Trust {
    /// Bundle publishers.
    pub publishers: Vec<PublicKey>,
    /// Distinct publisher signatures required.
    pub threshold: usize,
    /// Signer of desired states.
    pub control_plane: Option<PublicKey>,
    /// Which key set `publishers` and `threshold` are (see [`flotilla_shared::keyset`]).
    pub key_set: u64,
    /// Digest of that set ([`SignedKeySet::digest`]); `None` for the configured keys.
    pub key_set_digest: Option<Sha256Digest>,
}

impl Trust {
    /// The publisher keys as the key set later ones must follow.
    pub fn keys(&self) -> Result<TrustedKeys, KeySetError> {
        TrustedKeys::new(self.key_set, self.publishers.clone(), self.threshold)
    }
}

/// Performs installs against one data directory.
#[derive(Debug, Clone)]
pub struct Installer {
    store: Store,
    /// Replaced as key sets are followed; each check loads it once.
    trust: Arc<ArcSwap<Trust>>,
    /// Held while key sets are followed, so two chains never apply at once.
    following: Arc<Mutex<()>>,
    placement: Placement,
}

/// A bundle that passed its self-tests and is ready to switch to.
#[derive(Debug)]
pub struct Staged {
    /// The loaded model.
    pub served: Arc<ServedModel>,
    /// Self-test outcomes (all passed).
    pub outcomes: Vec<selftest::SelfTestOutcome>,
}

/// What start-up restored.
#[derive(Debug)]
pub struct Restored {
    /// The model now loaded.
    pub staged: Staged,
    /// Whether the recorded active bundle failed and the previous one serves instead.
    pub fell_back: bool,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Installer {
    /// An installer using `backends` in order of preference, with automatic GPU providers and
    /// ONNX Runtime from `ORT_DYLIB_PATH`.
    pub fn new(store: Store, trust: Trust, backends: Vec<Backend>) -> Self {
        Self {
            store,
            trust: Arc::new(ArcSwap::from_pointee(trust)),
            following: Arc::new(Mutex::new(())),
            placement: Placement::new(backends),
        }
    }

    /// Uses `placement` to choose where models run.
    pub fn with_placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Where models may run.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The keys trusted now: the configured ones, or the latest key set followed.
    pub fn trust(&self) -> Arc<Trust> {
        self.trust.load_full()
    }

    /// Follows `chain` from the keys trusted now. Each key set that follows is kept in the
    /// store and its floor resets applied before it is trusted, so a crash never leaves the
    /// agent trusting keys it would forget. Returns the sets applied and why the chain stopped
    /// early, if it did.
    pub fn follow_key_sets(&self, chain: &[SignedKeySet]) -> Result<Followed> {
        let _following = self.following.lock().unwrap_or_else(|p| p.into_inner());
        let keys = self
            .trust()
            .keys()
            .context("the configured publisher keys cannot check key sets")?;
        let followed = keys.follow(chain);
        for accepted in &followed.accepted {
            self.store.append_key_set(&accepted.signed)?;
            self.trust_from(accepted)?;
            info!(
                key_set = accepted.keys.version(),
                publishers = accepted.keys.publishers().len(),
                threshold = accepted.keys.threshold(),
                "now trusting a new publisher key set"
            );
        }
        Ok(followed)
    }

    /// At start: follows the key sets kept in the store from the configured keys, checking each
    /// again, and finishes floor resets a crash interrupted. Kept sets that no longer follow
    /// (the configuration names other keys) are ignored, with a warning.
    pub fn restore_key_sets(&self) -> Result<()> {
        let _following = self.following.lock().unwrap_or_else(|p| p.into_inner());
        let chain = self.store.key_sets()?;
        if chain.is_empty() {
            return Ok(());
        }
        let keys = match self.trust().keys() {
            Ok(keys) => keys,
            Err(e) => {
                warn!(error = %e, "kept key sets ignored: the configured keys are not a key set");
                return Ok(());
            }
        };
        let followed = keys.follow(&chain);
        if let Some(e) = &followed.refused {
            warn!(error = %e, "a kept key set does not follow the configured keys; dropping it and those after it");
            let kept: Vec<SignedKeySet> =
                followed.accepted.iter().map(|a| a.signed.clone()).collect();
            self.store.truncate_key_sets(&kept)?;
        }
        for accepted in &followed.accepted {
            self.trust_from(accepted)?;
        }
        if let Some(last) = followed.accepted.last() {
            info!(
                key_set = last.keys.version(),
                "trusting the kept publisher key set"
            );
        }
        Ok(())
    }

    /// Applies an accepted set's floor resets (once) and trusts its keys.
    fn trust_from(&self, accepted: &flotilla_shared::keyset::Accepted) -> Result<()> {
        let keys = &accepted.keys;
        let current = self.trust();
        if let Some(key) = accepted.set.control_plane {
            info!(key_set = keys.version(), key = %key.id(), "desired states must now be signed by a new control-plane key");
        }
        self.trust.store(Arc::new(Trust {
            publishers: keys.publishers().to_vec(),
            threshold: keys.threshold(),
            control_plane: accepted.set.control_plane.or(current.control_plane),
            key_set: keys.version(),
            key_set_digest: Some(accepted.signed.digest()),
        }));
        // After the keys moved, so no bundle signed by a retired key meets the lowered floor.
        if self
            .store
            .reset_floors(&accepted.signed, &accepted.set.reset_floors)?
            && !accepted.set.reset_floors.is_empty()
        {
            info!(key_set = accepted.set.version, models = ?accepted.set.reset_floors, "sequence floors reset");
        }
        Ok(())
    }

    /// Whether a kept bundle's signatures meet the keys trusted now. Reads only its header.
    pub fn kept_is_trusted(&self, digest: &Sha256Digest) -> bool {
        use std::io::Read;
        let mut header = Vec::new();
        let read = std::fs::File::open(self.store.bundle_path(digest)).and_then(|file| {
            file.take(flotilla_shared::bundle::MAX_HEADER_BYTES as u64)
                .read_to_end(&mut header)
        });
        read.is_ok()
            && self
                .verifier(0)
                .is_ok_and(|v| v.verify_header(&header).is_ok())
    }

    /// The durable state.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// This host as the verifier sees it.
    pub fn host(&self) -> HostProfile {
        HostProfile {
            architecture: std::env::consts::ARCH.to_owned(),
            backends: self.usable_backends(),
            accelerator: false,
            agent_version: crate::agent_version(),
        }
    }

    fn usable_backends(&self) -> Vec<Backend> {
        self.placement.available_backends()
    }

    fn verifier(&self, now: u64) -> Result<Verifier, InstallError> {
        let trust = self.trust();
        Verifier::new(&trust.publishers, trust.threshold, now)
            .map(|v| v.host(self.host()))
            .map_err(|e| InstallError::at(Stage::Verify, e))
    }

    /// Checks a header (everything before the payload) as new: trusted, fresh, above the model's
    /// sequence floor, runnable here. Downloads call this before fetching any payload chunk.
    pub fn check_new_header(&self, header: &[u8]) -> Result<VerifiedBundle, InstallError> {
        let verifier = self.verifier(now())?;
        let verified = verifier
            .verify_header(header)
            .map_err(|e| InstallError::at(Stage::Verify, e))?;
        let floor = self
            .store
            .floor(&verified.manifest.name)
            .map_err(|e| InstallError::at(Stage::Verify, e))?;
        match floor {
            Some(floor) => verifier
                .sequence_floor(floor)
                .verify_header(header)
                .map_err(|e| InstallError::at(Stage::Verify, e)),
            None => Ok(verified),
        }
    }

    /// Verifies complete bundle bytes as new (see [`Installer::check_new_header`]) and the
    /// whole payload.
    pub fn verify_new(&self, bytes: &[u8]) -> Result<VerifiedBundle, InstallError> {
        let verified = self.check_new_header(bytes)?;
        let mut verifier = self.verifier(now())?;
        if let Some(floor) = self
            .store
            .floor(&verified.manifest.name)
            .map_err(|e| InstallError::at(Stage::Verify, e))?
        {
            verifier = verifier.sequence_floor(floor);
        }
        verifier
            .verify(bytes)
            .map_err(|e| InstallError::at(Stage::Verify, e))
    }

    /// Verifies a bundle this agent already accepted once (active, previous, or a rollback
    /// target): signatures, requirements and payload, but neither expiry nor the sequence floor.
    /// A model that was serving keeps serving after a restart even if its bundle has since
    /// expired, and the control plane may roll an agent back to a bundle it kept.
    pub fn verify_kept(&self, bytes: &[u8]) -> Result<VerifiedBundle, InstallError> {
        // Time zero disables the expiry check only; everything else applies.
        let verified = self
            .verifier(0)?
            .verify(bytes)
            .map_err(|e| InstallError::at(Stage::Verify, e))?;
        if verified.manifest.expires_at < now() {
            warn!(digest = %verified.digest.short(), "kept bundle has expired; serving it anyway");
        }
        Ok(verified)
    }

    /// Whether a complete bundle is already on disk (so no download is needed).
    pub fn has_bundle(&self, digest: &Sha256Digest) -> bool {
        self.store.bundle_path(digest).is_file()
    }

    /// Reads a kept bundle file.
    pub fn read_kept(&self, digest: &Sha256Digest) -> Result<Vec<u8>, InstallError> {
        let path = self.store.bundle_path(digest);
        std::fs::read(&path).map_err(|e| {
            InstallError::at(Stage::Stage, format!("cannot read {}: {e}", path.display()))
        })
    }

    /// Writes verified bundle bytes to the bundle store (atomically).
    pub fn keep(&self, verified: &VerifiedBundle, bytes: &[u8]) -> Result<(), InstallError> {
        let path = self.store.bundle_path(&verified.digest);
        write_atomic(&path, bytes).map_err(|e| InstallError::at(Stage::Stage, format!("{e:#}")))
    }

    /// Extracts, loads and self-tests a verified bundle. Nothing is activated.
    pub fn stage(&self, verified: &VerifiedBundle, bytes: &[u8]) -> Result<Staged, InstallError> {
        let served = self.prepare(verified, bytes)?;
        Self::self_test(served)
    }

    /// Extracts and loads a verified bundle beside the active model.
    pub fn prepare(
        &self,
        verified: &VerifiedBundle,
        bytes: &[u8],
    ) -> Result<ServedModel, InstallError> {
        let dir = self
            .extract(verified, bytes)
            .map_err(|e| InstallError::at(Stage::Stage, format!("{e:#}")))?;
        self.load(verified, &dir)
    }

    /// Runs a prepared model's self-tests; every one must pass.
    pub fn self_test(served: ServedModel) -> Result<Staged, InstallError> {
        let outcomes = selftest::run_all(&served.model, &served.manifest.self_tests);
        if let Some(failed) = outcomes.iter().find(|o| !o.passed()) {
            let reason = format!(
                "self-test {:?}: {}",
                failed.name,
                failed.failure.as_deref().unwrap_or("failed")
            );
            return Err(InstallError::at(Stage::SelfTest, reason));
        }
        Ok(Staged {
            served: Arc::new(served),
            outcomes,
        })
    }

    fn load(&self, verified: &VerifiedBundle, dir: &Path) -> Result<ServedModel, InstallError> {
        let allowed = &verified.manifest.requirements.backends;
        let targets = self.placement.targets(allowed);
        if targets.is_empty() {
            return Err(InstallError::at(Stage::Stage, "no usable backend"));
        }
        let started = Instant::now();
        let model = Model::load_on(dir, &verified.manifest.model, targets, &self.placement.ort)
            .map_err(|e| InstallError::at(Stage::Stage, e))?;
        if let Some(cause) = model.degradation() {
            warn!(digest = %verified.digest.short(), %cause, "model loaded on a fallback backend");
        }
        Ok(ServedModel {
            model,
            manifest: verified.manifest.clone(),
            digest: verified.digest,
            load_time: started.elapsed(),
        })
    }

    /// Extracts payload files into `models/D/`, unless a complete copy whose files match the
    /// manifest is already there. Writes to a staging folder and renames it into place.
    fn extract(&self, verified: &VerifiedBundle, bytes: &[u8]) -> Result<PathBuf> {
        let target = self.store.model_dir(&verified.digest);
        if extracted_matches(&target, &verified.manifest) {
            return Ok(target);
        }
        if target.exists() {
            warn!(digest = %verified.digest.short(), "extracted files differ from the manifest; extracting again");
            std::fs::remove_dir_all(&target)
                .with_context(|| format!("cannot remove {}", target.display()))?;
        }

        let staging = self.store.staging_dir(&verified.digest);
        if staging.exists() {
            std::fs::remove_dir_all(&staging)
                .with_context(|| format!("cannot remove {}", staging.display()))?;
        }
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("cannot create {}", staging.display()))?;
        let payload = Bundle::parse(bytes)?.payload;
        for entry in payload_entries(payload)? {
            // Paths were checked by the verifier: relative, normal components only.
            let path = staging.join(entry.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            write_synced(&path, entry.data)?;
        }
        sync_dir(&staging)?;
        std::fs::rename(&staging, &target)
            .with_context(|| format!("cannot move {} into place", staging.display()))?;
        sync_dir(target.parent().unwrap_or(&target))?;
        Ok(target)
    }

    /// Records `staged` as active and switches the slot; returns the model it replaced.
    pub fn activate(
        &self,
        staged: &Staged,
        slot: &ModelSlot,
    ) -> Result<Option<Arc<ServedModel>>, InstallError> {
        // A key set followed while the bundle loaded may have retired its keys: check again,
        // under the lock key sets are followed with, so none lands before it is recorded.
        let _following = self.following.lock().unwrap_or_else(|p| p.into_inner());
        if !self.kept_is_trusted(&staged.served.digest) {
            return Err(InstallError::at(
                Stage::Verify,
                "the trusted publisher keys changed during the install and no longer cover this bundle",
            ));
        }
        let m = &staged.served.manifest;
        self.store
            .record_activation(&staged.served.digest, &m.name, m.sequence)
            .map_err(|e| InstallError::at(Stage::Activate, format!("{e:#}")))?;
        info!(model = %m.id(), digest = %staged.served.digest.short(), "model activated");
        let replaced = slot.activate(staged.served.clone());
        if let Err(e) = self.prune() {
            warn!(error = %format!("{e:#}"), "cannot remove old bundles");
        }
        Ok(replaced)
    }

    /// Removes kept bundles and extracted models other than the active and previous ones, so
    /// an edge disk holds at most two versions (plus a download in progress).
    pub fn prune(&self) -> Result<()> {
        let keep: Vec<Sha256Digest> = [self.store.active()?, self.store.previous()?]
            .into_iter()
            .flatten()
            .collect();
        let kept = |name: &str| keep.iter().any(|d| name.starts_with(&d.to_hex()));
        for dir in ["bundles", "models"] {
            let path = self.store.root().join(dir);
            for entry in std::fs::read_dir(&path)
                .with_context(|| format!("cannot list {}", path.display()))?
            {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if kept(&name) || name.starts_with(".staging-") {
                    continue;
                }
                let target = entry.path();
                let removed = if target.is_dir() {
                    std::fs::remove_dir_all(&target)
                } else {
                    std::fs::remove_file(&target)
                };
                removed.with_context(|| format!("cannot remove {}", target.display()))?;
            }
        }
        Ok(())
    }

    /// Loads what the agent served before it stopped: the recorded active bundle, or, if that
    /// cannot be loaded and verified, the previous one (recorded as active from then on).
    pub fn restore(&self) -> Result<Option<Restored>> {
        let candidates = [self.store.active()?, self.store.previous()?];
        for (index, digest) in candidates.into_iter().enumerate() {
            let Some(digest) = digest else { continue };
            let attempt = self.read_kept(&digest).and_then(|bytes| {
                let verified = self.verify_kept(&bytes)?;
                let staged = self.stage(&verified, &bytes)?;
                Ok(staged)
            });
            match attempt {
                Ok(staged) => {
                    let fell_back = index == 1;
                    if fell_back {
                        self.store.record_fallback(&digest)?;
                    }
                    return Ok(Some(Restored { staged, fell_back }));
                }
                Err(e) => warn!(digest = %digest.short(), error = %e, "cannot restore bundle"),
            }
        }
        Ok(None)
    }
}

/// Whether `dir` holds every manifest file with the right size and hash.
fn extracted_matches(dir: &Path, manifest: &Manifest) -> bool {
    manifest.files.iter().all(|f| {
        std::fs::read(dir.join(&f.path))
            .is_ok_and(|data| data.len() as u64 == f.size && Sha256Digest::of(&data) == f.sha256)
    })
}

fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(data)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

/// Writes a file under a temporary name, syncs it, and renames it over `path`.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write_synced(&tmp, data)?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} into place", path.display()))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}
