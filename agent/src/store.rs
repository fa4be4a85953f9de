//! The agent's durable state in sled, and the layout of its data directory.
//!
//! ```text
//! DATA_DIR/state/            sled: active/previous bundle, sequence floors, download progress,
//!                            desired-state generation, accepted key sets, session counter,
//!                            telemetry outbox
//! DATA_DIR/bundles/D.fbundle complete, verified bundle files (active, previous, candidate)
//! DATA_DIR/models/D/         extracted payload files of bundle D, written to a staging folder
//!                            and renamed into place, so a folder here is always complete
//! DATA_DIR/downloads/D.*     partial downloads: header and payload written chunk by chunk
//! ```
//!
//! Every sled write that a later step depends on is flushed before that step runs, so after a
//! crash the recorded active bundle is always one whose files are complete on disk.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use flotilla_shared::{KeyId, Sha256Digest, SignedKeySet};

/// Key names in the `state` tree.
mod keys {
    pub const ACTIVE: &[u8] = b"active";
    pub const PREVIOUS: &[u8] = b"previous";
    pub const GENERATION: &[u8] = b"desired_generation";
    pub const KEY_SETS: &[u8] = b"key_sets";
    /// Followed by the SHA-256 of a key set's body: that set's floor resets ran.
    pub const FLOORS_RESET: &[u8] = b"floors_reset/";
}

/// Durable agent state.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    state: sled::Tree,
    floors: sled::Tree,
    downloads: sled::Tree,
    root: PathBuf,
}

impl Store {
    /// Opens (creating) the data directory and its database.
    pub fn open(root: &Path) -> Result<Self> {
        for dir in ["bundles", "models", "downloads"] {
            let path = root.join(dir);
            std::fs::create_dir_all(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
        }
        let db_path = root.join("state");
        let db = sled::open(&db_path)
            .with_context(|| format!("cannot open agent state {}", db_path.display()))?;
        let tree = |name: &str| {
            db.open_tree(name)
                .with_context(|| format!("cannot open state tree {name}"))
        };
        Ok(Self {
            state: tree("state")?,
            floors: tree("floors")?,
            downloads: tree("downloads")?,
            db: db.clone(),
            root: root.to_owned(),
        })
    }

    /// A named tree for other components (session counter, telemetry outbox).
    pub fn tree(&self, name: &str) -> Result<sled::Tree> {
        self.db
            .open_tree(name)
            .with_context(|| format!("cannot open state tree {name}"))
    }

    /// Flushes everything to disk.
    pub fn flush(&self) -> Result<()> {
        self.db.flush().context("cannot flush agent state")?;
        Ok(())
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a complete bundle file lives.
    pub fn bundle_path(&self, digest: &Sha256Digest) -> PathBuf {
        self.root.join("bundles").join(format!("{digest}.fbundle"))
    }

    /// Where a bundle's extracted files live.
    pub fn model_dir(&self, digest: &Sha256Digest) -> PathBuf {
        self.root.join("models").join(digest.to_hex())
    }

    /// Staging folder for extraction, renamed to [`Store::model_dir`] when complete.
    pub fn staging_dir(&self, digest: &Sha256Digest) -> PathBuf {
        self.root.join("models").join(format!(".staging-{digest}"))
    }

    /// Partial download files: header, payload.
    pub fn download_paths(&self, digest: &Sha256Digest) -> (PathBuf, PathBuf) {
        let dir = self.root.join("downloads");
        (
            dir.join(format!("{digest}.header")),
            dir.join(format!("{digest}.payload")),
        )
    }

    /// Bundle the agent serves, as recorded.
    pub fn active(&self) -> Result<Option<Sha256Digest>> {
        self.digest_at(keys::ACTIVE)
    }

    /// Bundle served before the active one, kept for rollback without download.
    pub fn previous(&self) -> Result<Option<Sha256Digest>> {
        self.digest_at(keys::PREVIOUS)
    }

    fn digest_at(&self, key: &[u8]) -> Result<Option<Sha256Digest>> {
        let Some(value) = self.state.get(key).context("cannot read agent state")? else {
            return Ok(None);
        };
        let bytes: [u8; 32] = value
            .as_ref()
            .try_into()
            .context("corrupt digest in agent state")?;
        Ok(Some(Sha256Digest(bytes)))
    }

    /// Records `digest` as active (the old active becomes previous) and raises the model's
    /// sequence floor, flushed before returning.
    ///
    /// Previous is written before active, so a crash between the two leaves the old bundle
    /// active (and recorded as previous too), never the new one without its predecessor. No
    /// `apply_batch`: sled 0.34's batches take a process-wide exclusive lock that deadlocks
    /// against a concurrent `flush`.
    pub fn record_activation(
        &self,
        digest: &Sha256Digest,
        model: &str,
        sequence: u64,
    ) -> Result<()> {
        let old = self.active()?;
        if let Some(old) = old.filter(|o| o != digest) {
            self.state
                .insert(keys::PREVIOUS, &old.0[..])
                .context("cannot record the previous bundle")?;
        }
        self.state
            .insert(keys::ACTIVE, &digest.0[..])
            .context("cannot record activation")?;
        self.raise_floor(model, sequence)?;
        self.flush()
    }

    /// Records that the active bundle could not be loaded at start and `fallback` serves instead.
    pub fn record_fallback(&self, fallback: &Sha256Digest) -> Result<()> {
        self.state
            .insert(keys::ACTIVE, &fallback.0[..])
            .context("cannot record fallback")?;
        self.flush()
    }

    /// Highest sequence number accepted for `model`; new downloads must exceed it.
    pub fn floor(&self, model: &str) -> Result<Option<u64>> {
        Ok(self
            .floors
            .get(model)
            .context("cannot read sequence floor")?
            .map(|v| be_u64(&v)))
    }

    fn raise_floor(&self, model: &str, sequence: u64) -> Result<()> {
        self.floors
            .fetch_and_update(model, |old| {
                let current = old.map(be_u64).unwrap_or(0);
                Some(current.max(sequence).to_be_bytes().to_vec())
            })
            .context("cannot raise sequence floor")?;
        Ok(())
    }

    /// Newest desired-state generation applied while control-plane key `signer` was trusted
    /// (`None`: the configured one). Generations count per key, so one pushed up by a key that a
    /// key set later retired (whoever stole it could send any number) binds no successor.
    pub fn desired_generation(&self, signer: Option<&KeyId>) -> Result<u64> {
        Ok(self
            .state
            .get(generation_key(signer))
            .context("cannot read agent state")?
            .map_or(0, |v| be_u64(&v)))
    }

    /// Records the newest desired-state generation under `signer`, flushed.
    pub fn set_desired_generation(&self, signer: Option<&KeyId>, generation: u64) -> Result<()> {
        self.state
            .insert(generation_key(signer), &generation.to_be_bytes())
            .context("cannot record generation")?;
        self.flush()
    }

    /// Key sets accepted after the configured one, oldest first (checked again on load).
    pub fn key_sets(&self) -> Result<Vec<SignedKeySet>> {
        let Some(bytes) = self
            .state
            .get(keys::KEY_SETS)
            .context("cannot read agent state")?
        else {
            return Ok(Vec::new());
        };
        serde_cbor::from_slice(&bytes).context("corrupt key sets in agent state")
    }

    /// Keeps an accepted key set after those already kept, flushed. Its floor resets are a
    /// separate step, [`Store::reset_floors`].
    pub fn append_key_set(&self, signed: &SignedKeySet) -> Result<()> {
        let mut chain = self.key_sets()?;
        chain.push(signed.clone());
        let bytes = serde_cbor::to_vec(&chain).context("cannot encode key sets")?;
        self.state
            .insert(keys::KEY_SETS, bytes)
            .context("cannot record a key set")?;
        self.flush()
    }

    /// Keeps only `chain`: the kept sets that still follow the configured keys. Flushed.
    pub fn truncate_key_sets(&self, chain: &[SignedKeySet]) -> Result<()> {
        let bytes = serde_cbor::to_vec(&chain).context("cannot encode key sets")?;
        self.state
            .insert(keys::KEY_SETS, bytes)
            .context("cannot record the key sets")?;
        self.flush()
    }

    /// Sets the floors key set `signed` resets, once: a set whose resets ran already changes
    /// nothing, however often it is followed again, so floors raised since are never lowered
    /// again. A different set of the same version (another fleet's) runs its own. Flushed.
    ///
    /// Key sets are appended before their resets run, so after a crash in between the start-up
    /// check finds this one not yet done and finishes it, before any install.
    pub fn reset_floors(
        &self,
        signed: &SignedKeySet,
        floors: &BTreeMap<String, u64>,
    ) -> Result<bool> {
        let done = [keys::FLOORS_RESET, signed.digest().to_hex().as_bytes()].concat();
        if self
            .state
            .get(&done)
            .context("cannot read agent state")?
            .is_some()
        {
            return Ok(false);
        }
        for (model, floor) in floors {
            self.floors
                .insert(model.as_bytes(), &floor.to_be_bytes())
                .context("cannot reset a sequence floor")?;
        }
        self.state
            .insert(done, &[1u8])
            .context("cannot record the floor reset")?;
        self.flush()?;
        Ok(true)
    }

    /// Which payload chunks of a download are on disk, one bit per chunk.
    pub fn download_bitmap(&self, digest: &Sha256Digest) -> Result<Option<Vec<u8>>> {
        Ok(self
            .downloads
            .get(digest.0)
            .context("cannot read download progress")?
            .map(|v| v.to_vec()))
    }

    /// Persists download progress. Callers sync the chunk data first.
    pub fn set_download_bitmap(&self, digest: &Sha256Digest, bitmap: &[u8]) -> Result<()> {
        self.downloads
            .insert(digest.0, bitmap)
            .context("cannot record download progress")?;
        Ok(())
    }

    /// Forgets a download's progress.
    pub fn clear_download(&self, digest: &Sha256Digest) -> Result<()> {
        self.downloads
            .remove(digest.0)
            .context("cannot clear download progress")?;
        Ok(())
    }
}

fn generation_key(signer: Option<&KeyId>) -> Vec<u8> {
    match signer {
        None => keys::GENERATION.to_vec(),
        Some(id) => [keys::GENERATION, b"/", id.0.to_hex().as_bytes()].concat(),
    }
}

fn be_u64(bytes: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let n = bytes.len().min(8);
    a[8 - n..].copy_from_slice(&bytes[bytes.len() - n..]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the store again once the dropped one let go: sled's background flusher may hold
    /// the database's file lock for a moment after the last handle is dropped.
    fn reopen(root: &Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(root) {
                Ok(store) => return store,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(format!("{e:#}").contains("acquire lock"), "{e:#}");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e:#}"),
            }
        }
    }

    #[test]
    fn activation_moves_active_to_previous_and_raises_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (Sha256Digest::of(b"a"), Sha256Digest::of(b"b"));
        store.record_activation(&a, "m", 3).unwrap();
        store.record_activation(&b, "m", 2).unwrap();
        assert_eq!(store.active().unwrap(), Some(b));
        assert_eq!(store.previous().unwrap(), Some(a));
        assert_eq!(
            store.floor("m").unwrap(),
            Some(3),
            "the floor never goes down"
        );
        drop(store);

        let reopened = reopen(dir.path());
        assert_eq!(reopened.active().unwrap(), Some(b));
        assert_eq!(reopened.floor("m").unwrap(), Some(3));
    }

    #[test]
    fn a_key_set_resets_floors_once_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Sha256Digest::of(b"d");
        store.record_activation(&d, "m", 1_000_000).unwrap();
        store.record_activation(&d, "other", 7).unwrap();

        let set = |body: &[u8]| SignedKeySet {
            version: 2,
            body: body.to_vec(),
            signatures: vec![],
        };
        let resets = BTreeMap::from([("m".to_owned(), 5)]);
        assert!(store.reset_floors(&set(b"ours"), &resets).unwrap());
        assert_eq!(store.floor("m").unwrap(), Some(5), "lowered");
        assert_eq!(store.floor("other").unwrap(), Some(7), "untouched");

        store.record_activation(&d, "m", 6).unwrap();
        assert!(
            !store.reset_floors(&set(b"ours"), &resets).unwrap(),
            "a set's resets run once"
        );
        assert_eq!(store.floor("m").unwrap(), Some(6));

        store.append_key_set(&set(b"ours")).unwrap();
        drop(store);
        let reopened = reopen(dir.path());
        assert_eq!(reopened.key_sets().unwrap(), vec![set(b"ours")]);
        assert!(!reopened.reset_floors(&set(b"ours"), &resets).unwrap());
        // Another set of the same version (another fleet's chain) runs its own.
        assert!(reopened.reset_floors(&set(b"theirs"), &resets).unwrap());
        assert_eq!(reopened.floor("m").unwrap(), Some(5));
    }
}
