//! The server's durable state in sled: agents, bundles, desired states, rollouts, events,
//! and the publisher key sets that followed the configured keys.
//!
//! Every tree maps a key to one CBOR value, except `payloads` (raw bundle bytes, keyed by
//! digest), and `events` and `trust` (keyed by a big-endian event id or key set version, so
//! iteration is in order).
//! Writes go through [`Store`] and callers [`Store::flush`] before acknowledging an API
//! request, so what the API confirmed survives a crash.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use flotilla_shared::wire::DesiredState;
use flotilla_shared::{KeyId, Sha256Digest, SignedKeySet};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::registry::AgentRecord;
use crate::rollout::Rollout;

/// A bundle the server holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BundleRecord {
    /// SHA-256 of the manifest.
    #[schema(value_type = String)]
    pub digest: Sha256Digest,
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// The manifest's sequence number.
    pub sequence: u64,
    /// Bundle size in bytes.
    pub size: u64,
    /// Chunks in the payload.
    pub chunks: u32,
    /// The task, as in the manifest.
    pub task: String,
    /// Backends the bundle allows.
    pub backends: Vec<String>,
    /// When the manifest expires, Unix seconds.
    pub expires_at: u64,
    /// Key ids of the trusted publishers whose signatures verified.
    pub signed_by: Vec<String>,
    /// When it was uploaded, Unix milliseconds.
    pub uploaded_ms: u64,
}

/// One entry of the event log (appended; the oldest are trimmed past `max_events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventRecord {
    /// Position in the log, from 1.
    pub id: u64,
    /// When the server recorded it, Unix milliseconds.
    pub at_ms: u64,
    /// The agent it concerns.
    pub agent: Option<String>,
    /// The rollout it concerns.
    pub rollout: Option<String>,
    /// What happened, as a short snake_case name.
    pub kind: String,
    /// The same in words.
    pub message: String,
    /// The full record as JSON.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// Every tree of the store, as backups name them.
pub const TREES: [&str; 8] = [
    "agents",
    "bundles",
    "payloads",
    "desired",
    "rollouts",
    "events",
    "trust",
    "approvals",
];

/// Every record but the bundle payloads, and the payloads' keys, as of one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// (tree, key, value) for each record of each tree but `payloads`.
    pub records: Vec<(&'static str, Vec<u8>, Vec<u8>)>,
    /// Keys of the bundle payloads those records refer to.
    pub payloads: Vec<Vec<u8>>,
}

/// Handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    agents: sled::Tree,
    bundles: sled::Tree,
    payloads: sled::Tree,
    desired: sled::Tree,
    rollouts: sled::Tree,
    events: sled::Tree,
    trust: sled::Tree,
    /// Keys approved ahead for agents not seen yet: agent id → key id.
    approvals: sled::Tree,
    /// The last event id given out. Kept from the log itself rather than the database's id
    /// generator, so a restored log goes on where it ended.
    last_event: Arc<AtomicU64>,
    /// The id of the newest event appended, for readers that wait for the next.
    appended: Arc<tokio::sync::watch::Sender<u64>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::open(dir.join("db"))
            .with_context(|| format!("cannot open the database in {}", dir.display()))?;
        let tree = |name: &str| {
            db.open_tree(name)
                .with_context(|| format!("cannot open tree {name}"))
        };
        let events = tree("events")?;
        let last_event = match events.last().context("cannot read the event log")? {
            Some((key, _)) => event_id(&key)?,
            None => 0,
        };
        Ok(Self {
            agents: tree("agents")?,
            bundles: tree("bundles")?,
            payloads: tree("payloads")?,
            desired: tree("desired")?,
            rollouts: tree("rollouts")?,
            events,
            trust: tree("trust")?,
            approvals: tree("approvals")?,
            last_event: Arc::new(AtomicU64::new(last_event)),
            appended: Arc::new(tokio::sync::watch::Sender::new(last_event)),
            db,
        })
    }

    fn tree(&self, name: &str) -> Option<&sled::Tree> {
        Some(match name {
            "agents" => &self.agents,
            "bundles" => &self.bundles,
            "payloads" => &self.payloads,
            "desired" => &self.desired,
            "rollouts" => &self.rollouts,
            "events" => &self.events,
            "trust" => &self.trust,
            "approvals" => &self.approvals,
            _ => return None,
        })
    }

    /// Every record but the payloads, and the payloads' keys. Consistent only if nothing
    /// writes meanwhile: the caller holds the hub's lock, which every write goes through.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut snapshot = Snapshot::default();
        for name in TREES.into_iter().filter(|t| *t != "payloads") {
            let tree = self
                .tree(name)
                .expect("invariant: TREES are the store's trees");
            for item in tree.iter() {
                let (key, value) = item.with_context(|| format!("cannot read tree {name}"))?;
                if name == "bundles" {
                    snapshot.payloads.push(key.to_vec());
                }
                snapshot.records.push((name, key.to_vec(), value.to_vec()));
            }
        }
        Ok(snapshot)
    }

    /// A bundle payload by its key in the `payloads` tree.
    pub fn payload(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.payloads.get(key)?.map(|v| v.to_vec()))
    }

    /// Writes one record as a backup holds it. For restoring into a new store only.
    pub fn insert_raw(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<()> {
        let Some(found) = self.tree(tree) else {
            bail!("no tree {tree:?} in the store");
        };
        found.insert(key, value)?;
        if tree == "events" {
            self.last_event.fetch_max(event_id(key)?, Ordering::SeqCst);
        }
        Ok(())
    }

    /// [`Store::flush`], for callers outside a runtime.
    pub fn flush_blocking(&self) -> Result<()> {
        self.db.flush().context("cannot flush the database")?;
        Ok(())
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<()> {
        self.db
            .flush_async()
            .await
            .context("cannot flush the database")?;
        Ok(())
    }

    /// The key sets that followed the configured keys, oldest first, as signed.
    pub fn key_sets(&self) -> Result<Vec<SignedKeySet>> {
        self.trust
            .iter()
            .values()
            .map(|v| {
                let bytes = v.context("cannot read the key sets")?;
                SignedKeySet::decode(&bytes).context("corrupt key set in the store")
            })
            .collect()
    }

    /// Keeps key set `version`.
    pub fn put_key_set(&self, version: u64, signed: &SignedKeySet) -> Result<()> {
        self.trust
            .insert(version.to_be_bytes(), signed.encode())
            .context("cannot record the key set")?;
        Ok(())
    }

    /// Every key approved ahead, by agent id.
    pub fn approvals(&self) -> Result<BTreeMap<String, KeyId>> {
        let mut out = BTreeMap::new();
        for item in self.approvals.iter() {
            let (agent, key) = item.context("cannot read the approvals")?;
            let agent = String::from_utf8(agent.to_vec()).context("an approval's agent id")?;
            let key: [u8; 32] = key
                .as_ref()
                .try_into()
                .context("an approval's key id is not 32 bytes")?;
            out.insert(agent, KeyId(Sha256Digest(key)));
        }
        Ok(out)
    }

    /// Approves `key` ahead for `agent`, or (`None`) withdraws its approval.
    pub fn put_approval(&self, agent: &str, key: Option<&KeyId>) -> Result<()> {
        match key {
            Some(key) => self.approvals.insert(agent.as_bytes(), &key.0 .0)?,
            None => self.approvals.remove(agent.as_bytes())?,
        };
        Ok(())
    }

    /// Every agent record.
    pub fn agents(&self) -> Result<Vec<AgentRecord>> {
        values(&self.agents)
    }

    /// Writes an agent record.
    pub fn put_agent(&self, record: &AgentRecord) -> Result<()> {
        put(&self.agents, record.id.as_bytes(), record)
    }

    /// Forgets an agent.
    pub fn remove_agent(&self, agent: &str) -> Result<()> {
        self.agents.remove(agent.as_bytes())?;
        self.desired.remove(agent.as_bytes())?;
        Ok(())
    }

    /// Every bundle record.
    pub fn bundles(&self) -> Result<Vec<BundleRecord>> {
        values(&self.bundles)
    }

    /// Stores a bundle and its record in one transaction-free pair of writes: the payload
    /// first, so a record never names missing bytes.
    pub fn put_bundle(&self, record: &BundleRecord, bytes: &[u8]) -> Result<()> {
        let key = record.digest.to_hex();
        self.payloads.insert(key.as_bytes(), bytes)?;
        put(&self.bundles, key.as_bytes(), record)
    }

    /// Rewrites a bundle's record (its bytes stay).
    pub fn put_bundle_record(&self, record: &BundleRecord) -> Result<()> {
        put(&self.bundles, record.digest.to_hex().as_bytes(), record)
    }

    /// A bundle's bytes.
    pub fn bundle_bytes(&self, digest: &Sha256Digest) -> Result<Option<Vec<u8>>> {
        self.payload(digest.to_hex().as_bytes())
    }

    /// A bundle's bytes as the database holds them, without copying them.
    pub fn bundle_payload(&self, digest: &Sha256Digest) -> Result<Option<sled::IVec>> {
        Ok(self.payloads.get(digest.to_hex().as_bytes())?)
    }

    /// Every agent's latest desired state.
    pub fn desired_states(&self) -> Result<Vec<DesiredState>> {
        values(&self.desired)
    }

    /// Records the desired state issued to an agent.
    pub fn put_desired(&self, state: &DesiredState) -> Result<()> {
        put(&self.desired, state.agent.as_bytes(), state)
    }

    /// Every rollout.
    pub fn rollouts(&self) -> Result<Vec<Rollout>> {
        values(&self.rollouts)
    }

    /// Writes a rollout's whole state.
    pub fn put_rollout(&self, rollout: &Rollout) -> Result<()> {
        put(&self.rollouts, rollout.id().as_bytes(), rollout)
    }

    /// Appends to the event log, assigning the id.
    pub fn append_event(&self, mut record: EventRecord) -> Result<EventRecord> {
        let id = self.last_event.fetch_add(1, Ordering::SeqCst) + 1;
        record.id = id;
        let bytes = serde_json::to_vec(&record)?;
        self.events.insert(id.to_be_bytes(), bytes)?;
        self.appended.send_if_modified(|newest| {
            let newer = id > *newest;
            *newest = (*newest).max(id);
            newer
        });
        Ok(record)
    }

    /// Changes each time an event is appended (to the newest id).
    pub fn watch_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Removes the oldest events so that none older than the newest `keep` ids remain, at most
    /// `batch` of them in one call; returns how many it removed.
    pub fn prune_events(&self, keep: u64, batch: usize) -> Result<usize> {
        let Some(cutoff) = self.last_event.load(Ordering::SeqCst).checked_sub(keep) else {
            return Ok(0);
        };
        let mut removed = 0;
        for key in self
            .events
            .range(..=cutoff.to_be_bytes())
            .keys()
            .take(batch)
        {
            self.events.remove(key?)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Events with ids above `after`, oldest first, that `keep` accepts, at most `limit`.
    pub fn events(
        &self,
        after: u64,
        limit: usize,
        keep: impl Fn(&EventRecord) -> bool,
    ) -> Result<Vec<EventRecord>> {
        collect_events(self.events.range((after + 1).to_be_bytes()..), limit, keep)
    }

    /// The latest `limit` events that `keep` accepts, newest first.
    pub fn latest_events(
        &self,
        limit: usize,
        keep: impl Fn(&EventRecord) -> bool,
    ) -> Result<Vec<EventRecord>> {
        collect_events(self.events.iter().rev(), limit, keep)
    }
}

/// An event's id from its key.
fn event_id(key: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = key.try_into().context("corrupt event key")?;
    Ok(u64::from_be_bytes(bytes))
}

fn collect_events(
    items: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    limit: usize,
    keep: impl Fn(&EventRecord) -> bool,
) -> Result<Vec<EventRecord>> {
    let mut out = Vec::new();
    for item in items {
        let (_, value) = item?;
        let record: EventRecord = serde_json::from_slice(&value).context("corrupt event record")?;
        if keep(&record) {
            out.push(record);
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out)
}

fn put<T: Serialize>(tree: &sled::Tree, key: &[u8], value: &T) -> Result<()> {
    let bytes = serde_cbor::to_vec(value).context("cannot encode a record")?;
    tree.insert(key, bytes)?;
    Ok(())
}

fn values<T: DeserializeOwned>(tree: &sled::Tree) -> Result<Vec<T>> {
    tree.iter()
        .map(|item| {
            let (key, value) = item?;
            serde_cbor::from_slice(&value).with_context(|| {
                format!(
                    "corrupt record {:?} in tree {:?}",
                    String::from_utf8_lossy(&key),
                    String::from_utf8_lossy(&tree.name())
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str) -> EventRecord {
        EventRecord {
            id: 0,
            at_ms: 1,
            agent: None,
            rollout: None,
            kind: kind.into(),
            message: kind.into(),
            detail: serde_json::Value::Null,
        }
    }

    fn ids(store: &Store) -> Vec<u64> {
        store
            .events(0, 100, |_| true)
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect()
    }

    #[test]
    fn pruning_keeps_the_newest_events_a_batch_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.prune_events(4, 3).unwrap(), 0, "an empty log");
        for n in 0..10 {
            store.append_event(event(&format!("e{n}"))).unwrap();
        }
        assert_eq!(store.prune_events(10, 3).unwrap(), 0, "within the limit");
        assert_eq!(store.prune_events(4, 3).unwrap(), 3);
        assert_eq!(ids(&store), [4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(store.prune_events(4, 3).unwrap(), 3);
        assert_eq!(store.prune_events(4, 3).unwrap(), 0);
        assert_eq!(ids(&store), [7, 8, 9, 10]);
        // Ids go on from the newest, and reopening the store keeps them going.
        assert_eq!(store.append_event(event("next")).unwrap().id, 11);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.append_event(event("after")).unwrap().id, 12);
        assert_eq!(store.prune_events(4, 100).unwrap(), 2);
        assert_eq!(ids(&store), [9, 10, 11, 12]);
    }
}
