//! Backups of the server's state: one file holding every record of every tree, taken while the
//! server runs and restored into an empty data directory.
//!
//! The file is a sequence of CBOR items: a [`Header`], one [`Entry`] per record, and an [`End`]
//! with the entry count and a SHA-256 over everything before it, so a truncated or altered file
//! is refused as a whole rather than restored in part. The small trees are read in one go under
//! the hub's lock, so they are consistent with each other; bundle payloads are immutable and
//! content-addressed and are read afterwards, one at a time.
//!
//! Keys are not in the backup: `control-plane.key`, any `control-plane-ID.key` a key set moved
//! to, and `admin.token` are copied separately (the API never hands out a signing key).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::store::{Snapshot, Store, TREES};

/// What [`Header::format`] says.
pub const FORMAT: &str = "flotilla-backup";
/// The format version this build writes: 2 added the `trust` tree (key sets), 3 the
/// `approvals` tree (agent keys approved ahead). Older files, which lack those trees, read
/// the same.
pub const VERSION: u32 = 3;
/// The oldest format version this build reads.
pub const OLDEST_READ: u32 = 1;

/// The first item: what the file is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// Format version.
    pub version: u32,
    /// When the snapshot was taken, Unix milliseconds.
    pub created_ms: u64,
    /// The server version that wrote it.
    pub server_version: String,
}

/// One record of one tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The tree's name, one of the store's trees.
    pub tree: String,
    /// The record's key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The record, as the store keeps it.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// The last item: how many entries came before it and their digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct End {
    /// Entries in the file.
    pub entries: u64,
    /// SHA-256 over the header and every entry (see `Checksum`).
    #[serde(with = "serde_bytes")]
    pub sha256: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Item {
    Header(Header),
    Entry(Entry),
    End(End),
}

/// The running digest of a backup: each field length-prefixed, so no two different
/// sequences of items hash alike.
#[derive(Default)]
struct Checksum(Sha256);

impl Checksum {
    fn field(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn header(&mut self, header: &Header) {
        self.field(header.format.as_bytes());
        self.field(&header.version.to_le_bytes());
        self.field(&header.created_ms.to_le_bytes());
        self.field(header.server_version.as_bytes());
    }

    fn entry(&mut self, entry: &Entry) {
        self.field(entry.tree.as_bytes());
        self.field(&entry.key);
        self.field(&entry.value);
    }

    fn finish(self) -> Vec<u8> {
        self.0.finalize().to_vec()
    }
}

/// What a backup holds: records per tree and their bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// When it was taken, Unix milliseconds.
    pub created_ms: u64,
    /// The server version that wrote it.
    pub server_version: String,
    /// Records per tree.
    pub records: BTreeMap<String, u64>,
    /// Bytes of bundle payloads.
    pub payload_bytes: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = |tree: &str| self.records.get(tree).copied().unwrap_or(0);
        write!(
            f,
            "{} agents, {} bundles ({} bytes), {} rollouts, {} desired states, {} key sets, {} \
             keys approved ahead, {} events",
            count("agents"),
            count("bundles"),
            self.payload_bytes,
            count("rollouts"),
            count("desired"),
            count("trust"),
            count("approvals"),
            count("events"),
        )
    }
}

/// Writes the backup of `snapshot` (taken from `store` under the hub's lock) to `out`: the
/// snapshot's records, then each bundle payload it names, read from `store` as it goes.
pub fn write(store: &Store, snapshot: Snapshot, created_ms: u64, out: impl Write) -> Result<()> {
    let mut out = ItemWriter::start(
        out,
        Header {
            format: FORMAT.into(),
            version: VERSION,
            created_ms,
            server_version: env!("CARGO_PKG_VERSION").into(),
        },
    )?;
    for (tree, key, value) in snapshot.records {
        out.entry(Entry {
            tree: tree.into(),
            key,
            value,
        })?;
    }
    for key in snapshot.payloads {
        let value = store.payload(&key)?.with_context(|| {
            format!("bundle payload {} vanished", String::from_utf8_lossy(&key))
        })?;
        out.entry(Entry {
            tree: "payloads".into(),
            key,
            value,
        })?;
    }
    out.finish()?.flush().context("cannot write the backup")
}

struct ItemWriter<W> {
    out: W,
    checksum: Checksum,
    entries: u64,
}

impl<W: Write> ItemWriter<W> {
    fn start(out: W, header: Header) -> Result<Self> {
        let mut writer = Self {
            out,
            checksum: Checksum::default(),
            entries: 0,
        };
        writer.checksum.header(&header);
        writer.item(&Item::Header(header))?;
        Ok(writer)
    }

    /// Writes the end: the entry count and the digest.
    fn finish(mut self) -> Result<W> {
        let end = End {
            entries: self.entries,
            sha256: std::mem::take(&mut self.checksum).finish(),
        };
        self.item(&Item::End(end))?;
        Ok(self.out)
    }

    fn item(&mut self, item: &Item) -> Result<()> {
        serde_cbor::to_writer(&mut self.out, item).context("cannot write the backup")
    }

    fn entry(&mut self, entry: Entry) -> Result<()> {
        self.checksum.entry(&entry);
        self.entries += 1;
        self.item(&Item::Entry(entry))
    }
}

/// Reads a whole backup from `input`, handing each entry to `take`, and checks it: the
/// format, the version, the tree names, the entry count, the digest and that nothing follows.
/// Returns what it held. `take` sees entries before the digest is checked, so a caller that
/// keeps them must discard them on error.
pub fn read(input: impl Read, mut take: impl FnMut(Entry) -> Result<()>) -> Result<Summary> {
    let mut items = serde_cbor::Deserializer::from_reader(input).into_iter::<Item>();
    let mut next = || -> Result<Option<Item>> {
        items
            .next()
            .transpose()
            .context("not a flotilla backup, or a damaged one")
    };
    let header = match next()? {
        Some(Item::Header(header)) if header.format == FORMAT => header,
        _ => bail!("not a flotilla backup (no {FORMAT} header)"),
    };
    if !(OLDEST_READ..=VERSION).contains(&header.version) {
        bail!(
            "backup format version {} (written by flotilla {}); this build reads versions \
             {OLDEST_READ} to {VERSION}",
            header.version,
            header.server_version
        );
    }
    let mut checksum = Checksum::default();
    checksum.header(&header);
    let mut summary = Summary {
        created_ms: header.created_ms,
        server_version: header.server_version,
        ..Summary::default()
    };
    let mut entries = 0u64;
    let end = loop {
        match next()? {
            Some(Item::Entry(entry)) => {
                if !TREES.contains(&entry.tree.as_str()) {
                    bail!("the backup holds an unknown tree {:?}", entry.tree);
                }
                checksum.entry(&entry);
                entries += 1;
                *summary.records.entry(entry.tree.clone()).or_default() += 1;
                if entry.tree == "payloads" {
                    summary.payload_bytes += entry.value.len() as u64;
                }
                take(entry)?;
            }
            Some(Item::End(end)) => break end,
            Some(Item::Header(_)) => bail!("the backup has a second header"),
            None => bail!("the backup is truncated: it ends after {entries} records"),
        }
    };
    if end.entries != entries {
        bail!(
            "the backup says it holds {} records but has {entries}",
            end.entries
        );
    }
    if end.sha256 != checksum.finish() {
        bail!("the backup is damaged: its checksum does not match its records");
    }
    if next()?.is_some() {
        bail!("the backup has data after its end");
    }
    Ok(summary)
}

/// Restores the backup at `file` into `data_dir`, which must hold no database yet. The records
/// go into a staging database that takes the real one's place only once the whole file has
/// checked out, so a bad file leaves `data_dir` as it was.
pub fn restore(file: &Path, data_dir: &Path) -> Result<Summary> {
    let target = data_dir.join("db");
    if target.exists() {
        bail!(
            "{} already holds a database; restore into a new data directory",
            data_dir.display()
        );
    }
    let input = std::fs::File::open(file)
        .with_context(|| format!("cannot open backup {}", file.display()))?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".restoring-")
        .tempdir_in(data_dir)
        .with_context(|| format!("cannot stage the restore in {}", data_dir.display()))?;

    let summary = {
        let store = Store::open(staging.path())?;
        let summary = read(std::io::BufReader::new(input), |entry| {
            store.insert_raw(&entry.tree, &entry.key, &entry.value)
        })
        .with_context(|| format!("cannot restore {}", file.display()))?;
        store.flush_blocking()?;
        summary
    };
    std::fs::rename(staging.path().join("db"), &target)
        .with_context(|| format!("cannot move the restored database to {}", target.display()))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::EventRecord;

    /// A store with a record in every tree, a payload and two events.
    fn filled(dir: &Path) -> Store {
        let store = Store::open(dir).unwrap();
        for (tree, key, value) in [
            ("agents", "edge-1", "agent record"),
            ("bundles", "abc", "bundle record"),
            ("payloads", "abc", "the bundle's bytes"),
            ("desired", "edge-1", "desired state"),
            ("rollouts", "r-1", "rollout"),
            ("trust", "key-set-2", "key set"),
            ("approvals", "edge-2", "key id"),
        ] {
            store
                .insert_raw(tree, key.as_bytes(), value.as_bytes())
                .unwrap();
        }
        for kind in ["started", "active"] {
            store.append_event(event(kind)).unwrap();
        }
        store
    }

    fn event(kind: &str) -> EventRecord {
        EventRecord {
            id: 0,
            at_ms: 1,
            agent: Some("edge-1".into()),
            rollout: None,
            kind: kind.into(),
            message: kind.into(),
            detail: serde_json::Value::Null,
        }
    }

    fn backup_of(store: &Store) -> Vec<u8> {
        let mut out = Vec::new();
        write(store, store.snapshot().unwrap(), 42, &mut out).unwrap();
        out
    }

    fn entries(bytes: &[u8]) -> Result<Vec<Entry>> {
        let mut taken = Vec::new();
        read(bytes, |entry| {
            taken.push(entry);
            Ok(())
        })?;
        Ok(taken)
    }

    #[test]
    fn a_backup_holds_every_record_and_restores_to_the_same_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = filled(&dir.path().join("old"));
        let bytes = backup_of(&store);

        let taken = entries(&bytes).unwrap();
        assert_eq!(taken.len(), 9, "a record of each tree, and two events");
        assert!(taken.iter().any(|e| e.tree == "approvals"));
        let payload = taken.iter().find(|e| e.tree == "payloads").unwrap();
        assert_eq!(payload.value, b"the bundle's bytes");
        let summary = read(&bytes[..], |_| Ok(())).unwrap();
        assert_eq!(summary.created_ms, 42);
        assert_eq!(summary.records["events"], 2);
        assert_eq!(summary.payload_bytes, 18);

        let file = dir.path().join("state.backup");
        std::fs::write(&file, &bytes).unwrap();
        let new = dir.path().join("new");
        assert_eq!(restore(&file, &new).unwrap(), summary);
        let restored = Store::open(&new).unwrap();
        assert_eq!(
            restored.snapshot().unwrap().records,
            store.snapshot().unwrap().records
        );
        assert_eq!(
            restored.payload(b"abc").unwrap().unwrap(),
            b"the bundle's bytes"
        );
        // The log goes on after the restored events instead of overwriting them.
        assert_eq!(restored.append_event(event("next")).unwrap().id, 3);
        assert_eq!(restored.events(0, 10, |_| true).unwrap().len(), 3);
    }

    #[test]
    fn a_damaged_truncated_or_foreign_file_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = backup_of(&filled(dir.path()));
        let refused = |bytes: &[u8]| entries(bytes).unwrap_err().to_string();

        let at = bytes
            .windows(5)
            .position(|w| w == b"rollo")
            .expect("the rollout record is in the file");
        let mut damaged = bytes.clone();
        damaged[at + 20] ^= 1;
        assert!(
            refused(&damaged).contains("damaged"),
            "{}",
            refused(&damaged)
        );
        // Cut between items (just before the end) and in the middle of one.
        let end = Item::End(End {
            entries: 8,
            sha256: vec![0; 32],
        });
        let end_len = serde_cbor::to_vec(&end).unwrap().len();
        let truncated = &bytes[..bytes.len() - end_len];
        assert!(
            refused(truncated).contains("truncated"),
            "{}",
            refused(truncated)
        );
        let cut = &bytes[..bytes.len() / 2];
        assert!(refused(cut).contains("damaged"), "{}", refused(cut));
        let mut longer = bytes.clone();
        longer.extend_from_slice(&bytes);
        assert!(
            refused(&longer).contains("after its end"),
            "{}",
            refused(&longer)
        );
        assert!(refused(b"{\"not\": \"cbor\"}").contains("not a flotilla backup"));
        assert!(refused(&[]).contains("not a flotilla backup"));
    }

    #[test]
    fn restore_refuses_a_used_data_dir_and_leaves_no_database_after_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = backup_of(&filled(&dir.path().join("old")));
        let file = dir.path().join("state.backup");
        std::fs::write(&file, &bytes[..bytes.len() - 40]).unwrap();
        let new = dir.path().join("new");
        let err = format!("{:#}", restore(&file, &new).unwrap_err());
        assert!(err.contains("cannot restore"), "{err}");
        assert!(!new.join("db").exists(), "nothing restored from a bad file");
        assert_eq!(
            std::fs::read_dir(&new).unwrap().count(),
            0,
            "no staging left"
        );

        std::fs::write(&file, &bytes).unwrap();
        restore(&file, &new).unwrap();
        let err = restore(&file, &new).unwrap_err().to_string();
        assert!(err.contains("already holds a database"), "{err}");
    }

    /// A backup of `records` with a header claiming `version`.
    fn backup_as(version: u32, records: &[(&str, &str, &str)]) -> Vec<u8> {
        let header = Header {
            format: FORMAT.into(),
            version,
            created_ms: 7,
            server_version: "0.0.1".into(),
        };
        let mut out = ItemWriter::start(Vec::new(), header).unwrap();
        for (tree, key, value) in records {
            out.entry(Entry {
                tree: (*tree).into(),
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
            })
            .unwrap();
        }
        out.finish().unwrap()
    }

    #[test]
    fn a_version_1_backup_reads_and_a_newer_one_is_refused_by_name() {
        let records = [("agents", "edge-1", "agent record")];
        let summary = read(&backup_as(1, &records)[..], |_| Ok(())).unwrap();
        assert_eq!(summary.records["agents"], 1);
        assert!(summary.to_string().contains("0 key sets"), "{summary}");

        let err = entries(&backup_as(VERSION + 1, &records))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("format version {}", VERSION + 1))
                && err.contains("written by flotilla 0.0.1")
                && err.contains(&format!("reads versions 1 to {VERSION}")),
            "{err}"
        );
    }
}
