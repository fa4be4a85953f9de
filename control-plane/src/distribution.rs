//! Serving bundle chunks to downloaders so that concurrent downloads share what is sent.
//!
//! Agents ask on `bundles/{digest}/requests`; answers go to `bundles/{digest}/chunks`, which
//! every downloader of that bundle listens to. A part published recently is not published again
//! when another agent asks for it (it is on its way to everyone already), so the server's egress
//! for N concurrent downloaders stays close to one copy of the bundle instead of N.
//!
//! A bundle is held in memory only while it is being downloaded: one nobody has asked about
//! for the hold time is let go, and read from the store again if it is asked for later.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use flotilla_shared::bundle::Bundle;
use flotilla_shared::wire::{Chunk, ChunkPart, ChunkRequest};
use flotilla_shared::Sha256Digest;

/// How long a published part counts as "on its way" to every listener. Default 1 s: longer
/// than a broker needs to fan a chunk out, shorter than a downloader's retry interval, so a
/// re-request after a loss is answered.
pub const DEFAULT_SHARE_WINDOW: Duration = Duration::from_secs(1);

/// How long a bundle stays in memory after the last request for it. Default 5 minutes: far
/// longer than a downloader's retry interval, so a download in progress never reloads it.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(300);

/// Answers chunk requests for the bundles it holds.
#[derive(Debug, Default)]
pub struct ChunkServer {
    bundles: HashMap<Sha256Digest, Held>,
    share_window: Duration,
    /// Payload bytes published, since start (header and chunk data).
    pub bytes_published: u64,
}

#[derive(Debug)]
struct Held {
    bytes: Vec<u8>,
    header_len: usize,
    chunk_ranges: Vec<std::ops::Range<usize>>,
    recently_sent: HashMap<ChunkPart, Instant>,
    /// When it was inserted or last asked for.
    last_asked: Instant,
}

impl ChunkServer {
    /// A server that suppresses repeats within `share_window`.
    pub fn new(share_window: Duration) -> Self {
        Self {
            bundles: HashMap::new(),
            share_window,
            bytes_published: 0,
        }
    }

    /// Holds a bundle (already verified by the caller) for serving, as asked for at `now`.
    pub fn insert(
        &mut self,
        bytes: Vec<u8>,
        now: Instant,
    ) -> Result<Sha256Digest, flotilla_shared::BundleError> {
        let bundle = Bundle::parse(&bytes)?;
        let digest = bundle.digest();
        let manifest = bundle.decode_manifest_unverified()?;
        let header_len = bytes.len() - bundle.payload.len();
        let chunk_ranges = (0..manifest.chunks.len())
            .filter_map(|i| manifest.chunk_range(i))
            .map(|r| header_len + r.start as usize..header_len + r.end as usize)
            .collect();
        self.bundles.insert(
            digest,
            Held {
                bytes,
                header_len,
                chunk_ranges,
                recently_sent: HashMap::new(),
                last_asked: now,
            },
        );
        Ok(digest)
    }

    /// Whether the bundle is held.
    pub fn holds(&self, digest: &Sha256Digest) -> bool {
        self.bundles.contains_key(digest)
    }

    /// Lets go of every bundle not asked for within `hold` before `now`; returns how many.
    pub fn release_idle(&mut self, now: Instant, hold: Duration) -> usize {
        let before = self.bundles.len();
        self.bundles
            .retain(|_, held| now.saturating_duration_since(held.last_asked) < hold);
        before - self.bundles.len()
    }

    /// Bundles held, and their bytes.
    pub fn held(&self) -> (usize, u64) {
        let bytes = self.bundles.values().map(|h| h.bytes.len() as u64).sum();
        (self.bundles.len(), bytes)
    }

    /// The parts to publish in answer to `request` at `now`: each requested part not published
    /// within the share window, or a single [`ChunkPart::Unknown`] for a bundle not held.
    pub fn answer(
        &mut self,
        digest: &Sha256Digest,
        request: &ChunkRequest,
        now: Instant,
    ) -> Vec<Chunk> {
        let Some(held) = self.bundles.get_mut(digest) else {
            return vec![Chunk {
                part: ChunkPart::Unknown,
                data: Vec::new(),
            }];
        };
        held.last_asked = held.last_asked.max(now);
        let window = self.share_window;
        let mut parts: Vec<ChunkPart> = Vec::new();
        if request.header {
            parts.push(ChunkPart::Header);
        }
        parts.extend(request.chunks.iter().map(|i| ChunkPart::Payload(*i)));

        let mut out = Vec::new();
        for part in parts {
            let range = match part {
                ChunkPart::Header => 0..held.header_len,
                ChunkPart::Payload(i) => match held.chunk_ranges.get(i as usize) {
                    Some(r) => r.clone(),
                    None => continue,
                },
                ChunkPart::Unknown => continue,
            };
            let fresh = held
                .recently_sent
                .get(&part)
                .is_some_and(|t| now.duration_since(*t) < window);
            if fresh {
                continue;
            }
            held.recently_sent.insert(part, now);
            self.bytes_published += range.len() as u64;
            out.push(Chunk {
                part,
                data: held.bytes[range].to_vec(),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::manifest::*;
    use flotilla_shared::BundleBuilder;

    fn bundle() -> Vec<u8> {
        bundle_of(10_000)
    }

    fn bundle_of(model_bytes: usize) -> Vec<u8> {
        let manifest = Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            name: "m".into(),
            version: semver::Version::new(1, 0, 0),
            sequence: 1,
            created_at: 0,
            expires_at: 10,
            files: vec![],
            payload_size: 0,
            chunk_size: MIN_CHUNK_SIZE,
            chunks: vec![],
            model: ModelMeta {
                entry: "m.onnx".into(),
                opset: 14,
                inputs: vec![],
                outputs: vec![],
                task: Task::Raw,
                text: None,
                labels: vec![],
            },
            requirements: Requirements {
                min_agent_version: None,
                architectures: vec![],
                backends: vec![Backend::Tract],
                accelerator: false,
            },
            self_tests: vec![],
        };
        BundleBuilder::new(manifest)
            .file("m.onnx", vec![7; model_bytes])
            .build()
            .unwrap()
            .1
    }

    #[test]
    fn concurrent_requests_for_a_part_publish_it_once() {
        let mut server = ChunkServer::new(DEFAULT_SHARE_WINDOW);
        let bytes = bundle();
        let t0 = Instant::now();
        let digest = server.insert(bytes.clone(), t0).unwrap();
        let ask = |agent: &str| ChunkRequest {
            agent: agent.into(),
            header: true,
            chunks: vec![0, 1, 2],
        };

        let first = server.answer(&digest, &ask("a"), t0);
        assert_eq!(first.len(), 4);
        let published_once = server.bytes_published;
        assert!(server
            .answer(&digest, &ask("b"), t0 + Duration::from_millis(10))
            .is_empty());
        assert_eq!(
            server.bytes_published, published_once,
            "second downloader costs nothing"
        );

        // After the window, a re-request (a loss) is answered again.
        let again = server.answer(&digest, &ask("a"), t0 + Duration::from_secs(2));
        assert_eq!(again.len(), 4);
        let header = Bundle::parse(&bytes).unwrap();
        assert_eq!(first[0].data.len(), bytes.len() - header.payload.len());
    }

    #[test]
    fn unknown_bundles_and_out_of_range_chunks() {
        let mut server = ChunkServer::new(DEFAULT_SHARE_WINDOW);
        let digest = server.insert(bundle(), Instant::now()).unwrap();
        let other = Sha256Digest::of(b"other");
        let ask = ChunkRequest {
            agent: "a".into(),
            header: false,
            chunks: vec![99],
        };
        assert_eq!(
            server.answer(&other, &ask, Instant::now())[0].part,
            ChunkPart::Unknown
        );
        assert!(server.answer(&digest, &ask, Instant::now()).is_empty());
    }

    #[test]
    fn a_bundle_is_let_go_once_nobody_asked_for_it_within_the_hold() {
        let hold = Duration::from_secs(300);
        let mut server = ChunkServer::new(DEFAULT_SHARE_WINDOW);
        let t0 = Instant::now();
        let bytes = bundle();
        let digest = server.insert(bytes.clone(), t0).unwrap();
        let other = server.insert(bundle_of(20_000), t0).unwrap();
        let size = bytes.len() as u64;
        let ask = ChunkRequest {
            agent: "a".into(),
            header: true,
            chunks: vec![],
        };

        // Asked for near the end of its hold, `digest` gets a fresh one; `other` does not.
        assert_eq!(server.answer(&digest, &ask, t0 + hold / 2).len(), 1);
        assert_eq!(
            server.release_idle(t0 + hold - Duration::from_secs(1), hold),
            0
        );
        assert_eq!(server.release_idle(t0 + hold, hold), 1);
        assert!(server.holds(&digest) && !server.holds(&other));
        assert_eq!(server.held(), (1, size));

        assert_eq!(server.release_idle(t0 + hold / 2 + hold, hold), 1);
        assert_eq!(server.held(), (0, 0));
        assert_eq!(
            server.answer(&digest, &ask, t0 + 2 * hold)[0].part,
            ChunkPart::Unknown,
            "no longer held: the caller reads it from the store again"
        );
    }
}
