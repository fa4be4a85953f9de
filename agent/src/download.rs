//! Resumable, chunk-verified bundle download over MQTT.
//!
//! The agent asks for the header first and checks it (signatures, expiry, sequence floor, host
//! fit) before it asks for a single payload chunk. It then keeps a window of chunk requests in
//! flight, checks each chunk against the manifest's hash the moment it arrives, writes it at its
//! offset, and records it in a bitmap persisted in sled, so a restart resumes from the chunks
//! already on disk. Chunks are published once per bundle on a topic every downloader listens
//! to, so a chunk another agent asked for is just as welcome.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use flotilla_shared::bundle::Bundle;
use flotilla_shared::verify::chunk_is_valid;
use flotilla_shared::wire::{Chunk, ChunkPart, ChunkRequest};
use flotilla_shared::Sha256Digest;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::install::{write_atomic, InstallError, Installer, Stage};

/// Sends chunk requests to the control plane.
pub trait Requester: Send + Sync {
    /// Publishes `request` for bundle `digest`; must not block.
    fn request(&self, digest: &Sha256Digest, request: ChunkRequest) -> Result<(), String>;
}

/// Download tuning.
#[derive(Debug, Clone)]
pub struct DownloadConfig {
    /// Chunk requests in flight at once. Default 8.
    pub window: usize,
    /// How long to wait for a requested part before asking again. Default 2 s.
    pub retry_after: Duration,
    /// Longest wait between retries as they back off. Default 15 s.
    pub max_retry_after: Duration,
    /// Consecutive "unknown bundle" answers before giving up. Default 5.
    pub unknown_limit: u32,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        Self {
            window: 8,
            retry_after: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(15),
            unknown_limit: 5,
        }
    }
}

/// Progress as chunks arrive: (held, total).
pub type ProgressFn = Arc<dyn Fn(u32, u32) + Send + Sync>;

/// Downloads bundle `digest` and returns its complete bytes, header-verified and with every
/// chunk checked; the caller verifies the whole bundle before using it.
pub async fn download(
    digest: Sha256Digest,
    agent: &str,
    installer: &Installer,
    requester: &dyn Requester,
    chunks: &mut mpsc::Receiver<Chunk>,
    config: &DownloadConfig,
    progress: ProgressFn,
) -> Result<Vec<u8>, InstallError> {
    let fail = |e: anyhow::Error| InstallError::at(Stage::Download, format!("{e:#}"));
    let (header_path, payload_path) = installer.store().download_paths(&digest);

    let header = match std::fs::read(&header_path) {
        Ok(bytes) if header_digest(&bytes) == Some(digest) => bytes,
        _ => fetch_header(digest, agent, requester, chunks, config).await?,
    };
    let verified = installer.check_new_header(&header)?;
    write_atomic(&header_path, &header).map_err(fail)?;

    let manifest = &verified.manifest;
    let total = manifest.chunks.len();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&payload_path)
        .map_err(|e| {
            fail(anyhow::anyhow!(
                "cannot open {}: {e}",
                payload_path.display()
            ))
        })?;
    file.set_len(manifest.payload_size)
        .map_err(|e| fail(e.into()))?;
    let file = Arc::new(file);

    let store = installer.store().clone();
    let mut bitmap = store
        .download_bitmap(&digest)
        .map_err(fail)?
        .filter(|b| b.len() == total.div_ceil(8))
        .unwrap_or_else(|| vec![0u8; total.div_ceil(8)]);
    let has = |bitmap: &[u8], i: usize| bitmap[i / 8] & (1 << (i % 8)) != 0;
    let mut held = (0..total).filter(|i| has(&bitmap, *i)).count();
    progress(held as u32, total as u32);

    let mut outstanding: HashMap<usize, Instant> = HashMap::new();
    let mut wait = config.retry_after;
    let mut unknown = 0;
    while held < total {
        let now = Instant::now();
        outstanding.retain(|_, deadline| *deadline > now);
        let wanted: Vec<u32> = (0..total)
            .filter(|i| !has(&bitmap, *i) && !outstanding.contains_key(i))
            .take(config.window.saturating_sub(outstanding.len()))
            .map(|i| i as u32)
            .collect();
        if !wanted.is_empty() {
            for i in &wanted {
                outstanding.insert(*i as usize, now + wait);
            }
            let request = ChunkRequest {
                agent: agent.to_owned(),
                header: false,
                chunks: wanted,
            };
            if let Err(e) = requester.request(&digest, request) {
                debug!(error = %e, "chunk request not sent; will retry");
            }
        }

        let next_deadline = outstanding.values().min().copied().unwrap_or(now + wait);
        let chunk = match tokio::time::timeout_at(next_deadline, chunks.recv()).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return Err(InstallError::at(Stage::Download, "chunk stream closed")),
            Err(_) => {
                // Nothing arrived in time: the requests will be sent again, more patiently.
                wait = (wait * 2).min(config.max_retry_after);
                continue;
            }
        };

        let index = match chunk.part {
            ChunkPart::Payload(i) => i as usize,
            ChunkPart::Header => continue,
            ChunkPart::Unknown => {
                note_unknown(&mut unknown, config)?;
                continue;
            }
        };
        if index >= total || has(&bitmap, index) {
            continue;
        }
        if !chunk_is_valid(manifest, index, &chunk.data) {
            warn!(digest = %digest.short(), index, "chunk does not match its hash; asking again");
            outstanding.remove(&index);
            continue;
        }

        let offset = manifest.chunk_range(index).map_or(0, |r| r.start);
        bitmap[index / 8] |= 1 << (index % 8);
        let (file, store, snapshot) = (file.clone(), store.clone(), bitmap.clone());
        // Data is synced before the bitmap says it is there, so a crash can only lose progress,
        // never claim a chunk that is not on disk. Blocking IO, hence spawn_blocking.
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            file.write_all_at(&chunk.data, offset)?;
            file.sync_data()?;
            store.set_download_bitmap(&digest, &snapshot)
        })
        .await
        .map_err(|e| fail(e.into()))?
        .map_err(fail)?;

        outstanding.remove(&index);
        held += 1;
        wait = config.retry_after;
        progress(held as u32, total as u32);
    }

    let payload = std::fs::read(&payload_path).map_err(|e| fail(e.into()))?;
    let mut bytes = header;
    bytes.extend_from_slice(&payload);
    Ok(bytes)
}

/// Removes a finished or abandoned download's files and progress.
pub fn discard(installer: &Installer, digest: &Sha256Digest) {
    let (header, payload) = installer.store().download_paths(digest);
    let _ = std::fs::remove_file(header);
    let _ = std::fs::remove_file(payload);
    if let Err(e) = installer.store().clear_download(digest) {
        warn!(error = %e, "cannot clear download progress");
    }
}

/// Counts an "unknown bundle" answer; enough of them in a row end the download.
fn note_unknown(unknown: &mut u32, config: &DownloadConfig) -> Result<(), InstallError> {
    *unknown += 1;
    if *unknown >= config.unknown_limit {
        return Err(InstallError::at(
            Stage::Download,
            "the control plane does not hold this bundle",
        ));
    }
    Ok(())
}

/// The digest a header commits to, if it parses as one.
fn header_digest(header: &[u8]) -> Option<Sha256Digest> {
    let (manifest, _, len) = Bundle::parse_header(header).ok()?;
    (len == header.len()).then(|| Sha256Digest::of(manifest))
}

async fn fetch_header(
    digest: Sha256Digest,
    agent: &str,
    requester: &dyn Requester,
    chunks: &mut mpsc::Receiver<Chunk>,
    config: &DownloadConfig,
) -> Result<Vec<u8>, InstallError> {
    let mut wait = config.retry_after;
    let mut unknown = 0;
    loop {
        let request = ChunkRequest {
            agent: agent.to_owned(),
            header: true,
            chunks: Vec::new(),
        };
        if let Err(e) = requester.request(&digest, request) {
            debug!(error = %e, "header request not sent; will retry");
        }
        let deadline = Instant::now() + wait;
        loop {
            let chunk = match tokio::time::timeout_at(deadline, chunks.recv()).await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return Err(InstallError::at(Stage::Download, "chunk stream closed")),
                Err(_) => break,
            };
            match chunk.part {
                ChunkPart::Header if header_digest(&chunk.data) == Some(digest) => {
                    return Ok(chunk.data)
                }
                ChunkPart::Header => {
                    warn!(digest = %digest.short(), "header does not match the bundle digest; asking again")
                }
                ChunkPart::Unknown => note_unknown(&mut unknown, config)?,
                ChunkPart::Payload(_) => {}
            }
        }
        wait = (wait * 2).min(config.max_retry_after);
    }
}
