//! The agent's install pipeline on real bundles: resumable chunked download with loss and
//! corruption, verification, self-test gating, atomic activation, restore after restart, and
//! following key sets.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use flotilla_agent::download::{self, DownloadConfig, Requester};
use flotilla_agent::install::{Installer, Stage, Trust};
use flotilla_agent::serving::ModelSlot;
use flotilla_agent::store::Store;
use flotilla_shared::manifest::Backend;
use flotilla_shared::wire::{Chunk, ChunkPart, ChunkRequest};
use flotilla_shared::{Bundle, KeySet, KeySetError, SecretKey, Sha256Digest, SignedKeySet};
use flotilla_tests::{pack_signed, pack_signed_chunked, pack_signed_with, set_release, TestKeys};
use tokio::sync::mpsc;

/// Plays the control plane's chunk service in-process, with knobs for loss and corruption.
struct FakeServer {
    bundle: Vec<u8>,
    tx: mpsc::Sender<Chunk>,
    log: Mutex<Vec<u32>>,
    /// Chunks whose first answer is lost.
    lose_once: Mutex<HashSet<u32>>,
    /// Chunks whose first answer has a flipped byte.
    corrupt_once: Mutex<HashSet<u32>>,
    /// Stop answering after this many payload chunks (simulates a crash mid-download).
    answer_limit: Mutex<Option<usize>>,
}

impl FakeServer {
    fn new(bundle: Vec<u8>) -> (Arc<Self>, mpsc::Receiver<Chunk>) {
        let (tx, rx) = mpsc::channel(1024);
        let server = Self {
            bundle,
            tx,
            log: Mutex::default(),
            lose_once: Mutex::default(),
            corrupt_once: Mutex::default(),
            answer_limit: Mutex::default(),
        };
        (Arc::new(server), rx)
    }

    fn requested(&self) -> Vec<u32> {
        self.log.lock().unwrap().clone()
    }
}

impl Requester for FakeServer {
    fn request(&self, _digest: &Sha256Digest, request: ChunkRequest) -> Result<(), String> {
        let bundle = Bundle::parse(&self.bundle).unwrap();
        let manifest = bundle.decode_manifest_unverified().unwrap();
        if request.header {
            let header_len = self.bundle.len() - bundle.payload.len();
            let data = self.bundle[..header_len].to_vec();
            self.tx
                .try_send(Chunk {
                    part: ChunkPart::Header,
                    data,
                })
                .unwrap();
        }
        for index in request.chunks {
            let mut limit = self.answer_limit.lock().unwrap();
            if let Some(left) = limit.as_mut() {
                if *left == 0 {
                    continue;
                }
                *left -= 1;
            }
            self.log.lock().unwrap().push(index);
            if self.lose_once.lock().unwrap().remove(&index) {
                continue;
            }
            let range = manifest.chunk_range(index as usize).unwrap();
            let mut data = bundle.payload[range.start as usize..range.end as usize].to_vec();
            if self.corrupt_once.lock().unwrap().remove(&index) {
                data[0] ^= 0xff;
            }
            self.tx
                .try_send(Chunk {
                    part: ChunkPart::Payload(index),
                    data,
                })
                .unwrap();
        }
        Ok(())
    }
}

/// Opens the data directory's store. sled lets go of its lock on the files a moment after the
/// last handle of an earlier open is dropped (its flusher thread ends on its next tick), so a
/// reopen right after a drop may have to wait for that.
fn open_store(dir: &std::path::Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Store::open(dir) {
            Ok(store) => return store,
            Err(e) if std::time::Instant::now() < deadline => {
                assert!(format!("{e:#}").contains("lock"), "{e:#}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("{e:#}"),
        }
    }
}

fn installer(dir: &std::path::Path, keys: &TestKeys) -> Installer {
    let store = open_store(dir);
    let trust = Trust {
        publishers: vec![keys.publisher.public()],
        threshold: 1,
        control_plane: Some(keys.control_plane.public()),
        key_set: 1,
        key_set_digest: None,
    };
    Installer::new(store, trust, vec![Backend::Tract])
}

fn fast() -> DownloadConfig {
    DownloadConfig {
        window: 4,
        retry_after: std::time::Duration::from_millis(100),
        max_retry_after: std::time::Duration::from_millis(400),
        unknown_limit: 3,
    }
}

fn digest_of(bundle: &[u8]) -> Sha256Digest {
    Bundle::parse(bundle).unwrap().digest()
}

/// A multi-chunk bundle: the embedding model in 16 KiB chunks.
fn chunky_bundle(keys: &TestKeys) -> Vec<u8> {
    pack_signed_chunked("tiny-bert-embed", &keys.publisher, 16384)
}

async fn fetch(
    installer: &Installer,
    server: &FakeServer,
    rx: &mut mpsc::Receiver<Chunk>,
) -> Result<Vec<u8>, flotilla_agent::install::InstallError> {
    let digest = digest_of(&server.bundle);
    download::download(
        digest,
        "edge-1",
        installer,
        server,
        rx,
        &fast(),
        Arc::new(|_, _| {}),
    )
    .await
}

#[tokio::test]
async fn lost_and_corrupted_chunks_are_requested_again() {
    let keys = TestKeys::default();
    let dir = tempfile::tempdir().unwrap();
    let inst = installer(dir.path(), &keys);
    let bundle = chunky_bundle(&keys);
    let (server, mut rx) = FakeServer::new(bundle.clone());
    server.lose_once.lock().unwrap().extend([1, 5]);
    server.corrupt_once.lock().unwrap().extend([2, 7]);

    let bytes = fetch(&inst, &server, &mut rx).await.unwrap();
    assert_eq!(bytes, bundle);
    let requested = server.requested();
    for index in [1, 2, 5, 7] {
        assert_eq!(
            requested.iter().filter(|i| **i == index).count(),
            2,
            "chunk {index}: {requested:?}"
        );
    }
    assert_eq!(requested.iter().filter(|i| **i == 0).count(), 1);
}

#[tokio::test]
async fn restart_mid_download_fetches_only_missing_chunks() {
    let keys = TestKeys::default();
    let dir = tempfile::tempdir().unwrap();
    let bundle = chunky_bundle(&keys);
    let total = Bundle::parse(&bundle)
        .unwrap()
        .decode_manifest_unverified()
        .unwrap()
        .chunks
        .len();
    assert!(total >= 10, "needs a multi-chunk bundle, got {total}");

    {
        // First run: the server goes quiet after 6 chunks; the download is abandoned (a crash).
        let inst = installer(dir.path(), &keys);
        let (server, mut rx) = FakeServer::new(bundle.clone());
        *server.answer_limit.lock().unwrap() = Some(6);
        let attempt = tokio::time::timeout(
            std::time::Duration::from_millis(800),
            fetch(&inst, &server, &mut rx),
        )
        .await;
        assert!(
            attempt.is_err(),
            "download cannot finish with a silent server"
        );
        assert_eq!(server.requested().len(), 6);
    }

    // Second run on the same data directory: resumes, never asks for the 6 it holds.
    let inst = installer(dir.path(), &keys);
    let (server, mut rx) = FakeServer::new(bundle.clone());
    let bytes = fetch(&inst, &server, &mut rx).await.unwrap();
    assert_eq!(bytes, bundle);
    let requested = server.requested();
    assert_eq!(requested.len(), total - 6, "{requested:?}");
    assert!(
        requested.iter().all(|i| *i >= 4),
        "early chunks were already held: {requested:?}"
    );
}

#[tokio::test]
async fn header_from_an_untrusted_publisher_stops_before_any_payload() {
    let keys = TestKeys::default();
    let dir = tempfile::tempdir().unwrap();
    let inst = installer(dir.path(), &keys);
    let stranger = flotilla_shared::SecretKey::from_seed([99; 32]);
    let (server, mut rx) = FakeServer::new(pack_signed("tiny-mlp-raw", &stranger));
    let err = fetch(&inst, &server, &mut rx).await.unwrap_err();
    assert_eq!(err.stage, Stage::Verify);
    assert!(err.reason.contains("unknown keys"), "{err}");
    assert!(
        server.requested().is_empty(),
        "no payload chunk was requested"
    );
}

#[tokio::test]
async fn self_test_failure_keeps_the_current_model() {
    let keys = TestKeys::default();
    let dir = tempfile::tempdir().unwrap();
    let inst = installer(dir.path(), &keys);
    let slot = ModelSlot::new(2);

    let good = pack_signed("tiny-bert-embed", &keys.publisher);
    let verified = inst.verify_new(&good).unwrap();
    inst.keep(&verified, &good).unwrap();
    let staged = inst.stage(&verified, &good).unwrap();
    inst.activate(&staged, &slot).unwrap();

    let bad = pack_signed("tiny-bert-selftest-fail", &keys.publisher);
    let verified_bad = inst.verify_new(&bad).unwrap();
    let err = inst.stage(&verified_bad, &bad).unwrap_err();
    assert_eq!(err.stage, Stage::SelfTest);
    assert!(err.reason.contains("exceeds tolerance"), "{err}");
    assert_eq!(slot.current().unwrap().digest, verified.digest);
    assert_eq!(inst.store().active().unwrap(), Some(verified.digest));
}

#[tokio::test]
async fn unloadable_model_fails_at_stage() {
    let keys = TestKeys::default();
    let dir = tempfile::tempdir().unwrap();
    let inst = installer(dir.path(), &keys);
    let broken = pack_signed("broken-load", &keys.publisher);
    let verified = inst.verify_new(&broken).unwrap();
    let err = inst.stage(&verified, &broken).unwrap_err();
    assert_eq!(err.stage, Stage::Stage);
    assert!(err.reason.contains("FlotillaNoSuchOp"), "{err}");
}

#[tokio::test]
async fn sequence_floor_blocks_replays_but_kept_bundles_can_be_restored() {
    let keys = TestKeys::default();
    let dir = tempfile::tempdir().unwrap();
    let inst = installer(dir.path(), &keys);
    let slot = ModelSlot::new(2);

    let v1 = pack_signed("tiny-mlp-raw", &keys.publisher);
    let v2 = pack_signed_with("tiny-mlp-raw", &keys.publisher, |d| {
        set_release(d, "1.1.0", 2)
    });
    for bundle in [&v1, &v2] {
        let verified = inst.verify_new(bundle).unwrap();
        inst.keep(&verified, bundle).unwrap();
        let staged = inst.stage(&verified, bundle).unwrap();
        inst.activate(&staged, &slot).unwrap();
    }
    let err = inst.verify_new(&v1).unwrap_err();
    assert!(err.reason.contains("not above the floor 2"), "{err}");

    // Rollback path: v1 was kept, so it verifies as kept and stages without download.
    assert!(inst.has_bundle(&digest_of(&v1)));
    let kept = inst.read_kept(&digest_of(&v1)).unwrap();
    let verified = inst.verify_kept(&kept).unwrap();
    inst.stage(&verified, &kept).unwrap();
}

#[tokio::test]
async fn restart_restores_active_or_falls_back_to_previous() {
    let keys = TestKeys::default();
    let dir = tempfile::tempdir().unwrap();
    let v1 = pack_signed("tiny-mlp-raw", &keys.publisher);
    let v2 = pack_signed_with("tiny-mlp-raw", &keys.publisher, |d| {
        set_release(d, "1.1.0", 2)
    });
    {
        let inst = installer(dir.path(), &keys);
        let slot = ModelSlot::new(2);
        for bundle in [&v1, &v2] {
            let verified = inst.verify_new(bundle).unwrap();
            inst.keep(&verified, bundle).unwrap();
            let staged = inst.stage(&verified, bundle).unwrap();
            inst.activate(&staged, &slot).unwrap();
        }
    }

    let inst = installer(dir.path(), &keys);
    let restored = inst.restore().unwrap().unwrap();
    assert_eq!(restored.staged.served.digest, digest_of(&v2));
    assert!(!restored.fell_back);

    // Damage v2's kept bundle file: the restart must serve v1, complete and verified.
    let path = inst.store().bundle_path(&digest_of(&v2));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    drop(inst);

    let inst = installer(dir.path(), &keys);
    let restored = inst.restore().unwrap().unwrap();
    assert_eq!(restored.staged.served.digest, digest_of(&v1));
    assert!(restored.fell_back);
    assert_eq!(inst.store().active().unwrap(), Some(digest_of(&v1)));
}

#[tokio::test]
async fn tampered_extracted_files_are_replaced_from_the_verified_bundle() {
    let keys = TestKeys::default();
    let dir = tempfile::tempdir().unwrap();
    let inst = installer(dir.path(), &keys);
    let bundle = pack_signed("tiny-mlp-raw", &keys.publisher);
    let verified = inst.verify_new(&bundle).unwrap();
    inst.stage(&verified, &bundle).unwrap();

    let model = inst.store().model_dir(&verified.digest).join("model.onnx");
    std::fs::write(&model, b"not a model").unwrap();
    inst.stage(&verified, &bundle)
        .expect("re-extracts instead of loading the altered file");
    assert_ne!(std::fs::read(&model).unwrap(), b"not a model");
}

#[tokio::test]
async fn activation_keeps_only_the_active_and_previous_versions_on_disk() {
    let keys = TestKeys::default();
    let dir = tempfile::tempdir().unwrap();
    let inst = installer(dir.path(), &keys);
    let slot = ModelSlot::new(2);
    let releases: Vec<Vec<u8>> = (1..=3)
        .map(|n| {
            pack_signed_with("tiny-mlp-raw", &keys.publisher, |d| {
                set_release(d, &format!("1.{n}.0"), n)
            })
        })
        .collect();
    for bundle in &releases {
        let verified = inst.verify_new(bundle).unwrap();
        inst.keep(&verified, bundle).unwrap();
        let staged = inst.stage(&verified, bundle).unwrap();
        inst.activate(&staged, &slot).unwrap();
    }
    let on_disk = |sub: &str| std::fs::read_dir(dir.path().join(sub)).unwrap().count();
    assert_eq!(on_disk("bundles"), 2);
    assert_eq!(on_disk("models"), 2);
    assert!(
        !inst.has_bundle(&digest_of(&releases[0])),
        "the oldest release is gone"
    );
    assert!(
        inst.has_bundle(&digest_of(&releases[1])),
        "the previous release stays for rollback"
    );
}

fn install(inst: &Installer, slot: &ModelSlot, bundle: &[u8]) {
    let verified = inst.verify_new(bundle).unwrap();
    inst.keep(&verified, bundle).unwrap();
    let staged = inst.stage(&verified, bundle).unwrap();
    inst.activate(&staged, slot).unwrap();
}

/// Key set `version` trusting `new` alone, with `floors` reset, signed by `signers`.
fn key_set(
    version: u64,
    new: &SecretKey,
    floors: &[(&str, u64)],
    signers: &[&SecretKey],
) -> SignedKeySet {
    let mut set = KeySet::new(version, vec![new.public()], 1, 1_800_000_000);
    set.reset_floors = floors.iter().map(|(m, f)| ((*m).to_owned(), *f)).collect();
    let mut signed = SignedKeySet::new(&set);
    for key in signers {
        signed.add_signature(key);
    }
    signed
}

#[tokio::test]
async fn a_key_set_retires_a_stolen_key_and_undoes_its_fast_forward_across_restarts() {
    let keys = TestKeys::default();
    let stolen = &keys.publisher;
    let fresh = SecretKey::from_seed([33; 32]);
    let dir = tempfile::tempdir().unwrap();
    let slot = ModelSlot::new(2);
    let release = |key: &SecretKey, version: &str, sequence: u64| {
        pack_signed_with("tiny-mlp-raw", key, |d| set_release(d, version, sequence))
    };

    let honest = release(&fresh, "2.0.0", 6);
    {
        let inst = installer(dir.path(), &keys);
        install(&inst, &slot, &release(stolen, "1.0.0", 1));
        // The thief's release, numbered so high that no honest one could follow it.
        install(&inst, &slot, &release(stolen, "9.0.0", 1_000_000));
        let err = inst.verify_new(&honest).unwrap_err();
        assert!(
            err.reason.contains("unknown keys"),
            "not trusted yet: {err}"
        );

        // Signed by the fresh key alone: the trusted (stolen) key did not vouch for it.
        let unvouched = key_set(2, &fresh, &[], &[&fresh]);
        let followed = inst.follow_key_sets(&[unvouched]).unwrap();
        assert!(followed.accepted.is_empty());
        assert!(
            matches!(
                followed.refused,
                Some(KeySetError::ThresholdNotMet { by: 1, .. })
            ),
            "{:?}",
            followed.refused
        );
        // Key set 3 without 2 does not apply either.
        let skipping = key_set(3, &fresh, &[], &[stolen, &fresh]);
        let followed = inst.follow_key_sets(&[skipping]).unwrap();
        assert_eq!(
            followed.refused,
            Some(KeySetError::Skips {
                version: 3,
                current: 1
            })
        );
        assert_eq!(inst.trust().key_set, 1);

        let rotation = key_set(2, &fresh, &[("tiny-mlp-raw", 5)], &[stolen, &fresh]);
        let followed = inst.follow_key_sets(&[rotation]).unwrap();
        assert_eq!(followed.accepted.len(), 1, "{:?}", followed.refused);
        assert_eq!(inst.trust().key_set, 2);
        assert_eq!(inst.store().floor("tiny-mlp-raw").unwrap(), Some(5));
        assert!(
            !inst.kept_is_trusted(&slot.current().unwrap().digest),
            "the thief's release is no longer trusted"
        );

        let err = inst
            .verify_new(&release(stolen, "9.1.0", 1_000_001))
            .unwrap_err();
        assert_eq!(err.stage, Stage::Verify);
        assert!(err.reason.contains("unknown keys"), "{err}");
        install(&inst, &slot, &honest);
        assert!(inst.kept_is_trusted(&digest_of(&honest)));
    }

    // After a restart the agent still trusts key set 2, kept in its data directory, although
    // its configuration names the stolen key; and the reset does not run again.
    let inst = installer(dir.path(), &keys);
    inst.restore_key_sets().unwrap();
    assert_eq!(inst.trust().key_set, 2);
    assert_eq!(inst.store().floor("tiny-mlp-raw").unwrap(), Some(6));
    assert!(inst.verify_new(&release(stolen, "9.2.0", 7)).is_err());
    let restored = inst.restore().unwrap().unwrap();
    assert_eq!(restored.staged.served.digest, digest_of(&honest));
    assert!(!restored.fell_back);
}
fn installer_trusting(dir: &std::path::Path, keys: &TestKeys, publisher: &SecretKey) -> Installer {
    let trust = Trust {
        publishers: vec![publisher.public()],
        threshold: 1,
        control_plane: Some(keys.control_plane.public()),
        key_set: 1,
        key_set_digest: None,
    };
    Installer::new(open_store(dir), trust, vec![Backend::Tract])
}

#[tokio::test]
async fn a_bundle_whose_keys_a_key_set_retired_mid_install_is_not_activated() {
    let keys = TestKeys::default();
    let dir = tempfile::tempdir().unwrap();
    let inst = installer(dir.path(), &keys);
    let slot = ModelSlot::new(2);
    let fresh = SecretKey::from_seed([33; 32]);
    let bundle = pack_signed_with("tiny-mlp-raw", &keys.publisher, |d| {
        set_release(d, "9.0.0", 1_000_000)
    });
    let verified = inst.verify_new(&bundle).unwrap();
    inst.keep(&verified, &bundle).unwrap();
    let staged = inst.stage(&verified, &bundle).unwrap();

    // While it was loading, key set 2 retired its key and reset the floor it would raise.
    let rotation = key_set(
        2,
        &fresh,
        &[("tiny-mlp-raw", 5)],
        &[&keys.publisher, &fresh],
    );
    assert_eq!(inst.follow_key_sets(&[rotation]).unwrap().accepted.len(), 1);
    let err = inst.activate(&staged, &slot).unwrap_err();
    assert_eq!(err.stage, Stage::Verify);
    assert!(
        err.reason.contains("keys changed during the install"),
        "{err}"
    );
    assert!(slot.current().is_none());
    assert_eq!(inst.store().active().unwrap(), None);
    assert_eq!(inst.store().floor("tiny-mlp-raw").unwrap(), Some(5));
}

#[tokio::test]
async fn kept_key_sets_that_no_longer_follow_the_configured_keys_are_dropped() {
    let keys = TestKeys::default();
    let dir = tempfile::tempdir().unwrap();
    let first = &keys.publisher;
    let (second, other, next) = (
        SecretKey::from_seed([33; 32]),
        SecretKey::from_seed([44; 32]),
        SecretKey::from_seed([55; 32]),
    );
    {
        let inst = installer_trusting(dir.path(), &keys, first);
        let set = key_set(2, &second, &[("tiny-mlp-raw", 1)], &[first, &second]);
        assert_eq!(inst.follow_key_sets(&[set]).unwrap().accepted.len(), 1);
        let d = Sha256Digest::of(b"any");
        inst.store()
            .record_activation(&d, "tiny-mlp-raw", 1_000)
            .unwrap();
    }

    // Set up again for another fleet, whose first keys are `other`: the kept set 2 no longer
    // follows and is dropped, and that fleet's own set 2 then applies, floor reset included.
    let inst = installer_trusting(dir.path(), &keys, &other);
    inst.restore_key_sets().unwrap();
    assert_eq!(inst.trust().key_set, 1);
    assert!(inst.store().key_sets().unwrap().is_empty());
    let theirs = key_set(2, &next, &[("tiny-mlp-raw", 5)], &[&other, &next]);
    let followed = inst.follow_key_sets(&[theirs]).unwrap();
    assert_eq!(followed.accepted.len(), 1, "{:?}", followed.refused);
    assert_eq!(inst.store().floor("tiny-mlp-raw").unwrap(), Some(5));
    drop(inst);

    let inst = installer_trusting(dir.path(), &keys, &other);
    inst.restore_key_sets().unwrap();
    assert_eq!(inst.trust().key_set, 2);
    assert_eq!(inst.trust().publishers, vec![next.public()]);
    assert_eq!(inst.store().key_sets().unwrap().len(), 1);
}
