//! The real agent against a real broker (embedded rumqttd behind a cuttable relay) and a test
//! peer that plays the control plane: signed desired state, shared chunk topic, telemetry.

#[path = "../../agent/tests/support/broker.rs"]
mod broker;
#[path = "../../agent/tests/support/onnxruntime.rs"]
mod onnxruntime;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_agent::config::AgentConfig;
use flotilla_control_plane::distribution::ChunkServer;
use flotilla_shared::wire::{
    topics, ChunkRequest, ControlPlaneState, DesiredBundle, DesiredState, Envelope, EventKind,
    Health, Presence, SignedDesiredState, SignedReport, Telemetry,
};
use flotilla_shared::{Bundle, SecretKey, Sha256Digest};
use flotilla_tests::{
    free_port, pack_signed, pack_signed_chunked, pack_signed_with, set_release, TestKeys,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{broadcast, oneshot};

/// What the peer saw from agents.
// A test's record of a handful of messages; boxing the birth would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Seen {
    Presence(String, Presence),
    Telemetry(String, u64, Telemetry),
}

/// Plays the control plane's part over MQTT.
struct Peer {
    client: AsyncClient,
    seen: broadcast::Sender<Seen>,
    history: Arc<Mutex<Vec<Seen>>>,
    chunks: Arc<Mutex<ChunkServer>>,
    requested: Arc<Mutex<Vec<u32>>>,
    /// Chunk indices whose next answer is corrupted, and how many answers to allow in total.
    corrupt: Arc<Mutex<Vec<u32>>>,
    answer_budget: Arc<Mutex<Option<usize>>>,
}

impl Peer {
    async fn start(port: u16) -> Self {
        let mut options = MqttOptions::new("test-peer", "127.0.0.1", port);
        options.set_max_packet_size(4 << 20, 4 << 20);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut events) = AsyncClient::new(options, 256);
        let (seen, _) = broadcast::channel(4096);
        let peer = Self {
            client: client.clone(),
            seen: seen.clone(),
            history: Arc::default(),
            chunks: Arc::new(Mutex::new(ChunkServer::new(Duration::from_millis(200)))),
            requested: Arc::default(),
            corrupt: Arc::default(),
            answer_budget: Arc::default(),
        };
        let (history, chunks, requested, corrupt, budget) = (
            peer.history.clone(),
            peer.chunks.clone(),
            peer.requested.clone(),
            peer.corrupt.clone(),
            peer.answer_budget.clone(),
        );
        let (ready_tx, ready_rx) = oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        tokio::spawn(async move {
            loop {
                let event = match events.poll().await {
                    Ok(event) => event,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Event::Incoming(packet) = event else {
                    continue;
                };
                match packet {
                    Packet::ConnAck(_) => {
                        for filter in [
                            topics::all_agents("state"),
                            topics::all_agents("telemetry"),
                            "flotilla/v1/bundles/+/requests".to_owned(),
                        ] {
                            client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
                        }
                        // Listening now: agents may send their telemetry.
                        let state = ControlPlaneState {
                            online: true,
                            epoch: 1,
                        };
                        client
                            .publish(
                                topics::control_plane_state(),
                                QoS::AtLeastOnce,
                                true,
                                Envelope::new("control-plane", 1, 1, state).encode(),
                            )
                            .await
                            .unwrap();
                    }
                    Packet::SubAck(_) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Packet::Publish(p) => {
                        let topic = p.topic.clone();
                        if let Some(agent) = topics::agent_of(&topic) {
                            let Ok(report) = SignedReport::decode(&p.payload) else {
                                continue;
                            };
                            let item = if topic.ends_with("/state") {
                                let Ok(env) = report.envelope::<Presence>() else {
                                    continue;
                                };
                                if let Presence::Online(birth) = &env.body {
                                    assert!(
                                        report.is_signed_by(&topic, &birth.identity),
                                        "a birth is signed by the key it names"
                                    );
                                }
                                Seen::Presence(agent.to_owned(), env.body)
                            } else {
                                let Ok(env) = report.envelope::<Telemetry>() else {
                                    continue;
                                };
                                Seen::Telemetry(agent.to_owned(), env.seq, env.body)
                            };
                            tracing::debug!(?item, "peer saw");
                            history.lock().unwrap().push(item.clone());
                            let _ = seen.send(item);
                            continue;
                        }
                        let Some(digest) = topic
                            .strip_prefix("flotilla/v1/bundles/")
                            .and_then(|r| r.strip_suffix("/requests"))
                            .and_then(|d| d.parse::<Sha256Digest>().ok())
                        else {
                            continue;
                        };
                        let Ok(request) = Envelope::<ChunkRequest>::decode(&p.payload) else {
                            continue;
                        };
                        let answers =
                            chunks
                                .lock()
                                .unwrap()
                                .answer(&digest, &request.body, Instant::now());
                        for mut chunk in answers {
                            if let flotilla_shared::wire::ChunkPart::Payload(i) = chunk.part {
                                let mut budget = budget.lock().unwrap();
                                if let Some(left) = budget.as_mut() {
                                    if *left == 0 {
                                        continue;
                                    }
                                    *left -= 1;
                                }
                                requested.lock().unwrap().push(i);
                                let mut corrupt = corrupt.lock().unwrap();
                                if let Some(pos) = corrupt.iter().position(|c| *c == i) {
                                    corrupt.remove(pos);
                                    chunk.data[0] ^= 0xff;
                                }
                            }
                            let body = Envelope::new("control-plane", 0, 0, chunk).encode();
                            client
                                .publish(
                                    topics::bundle_chunks(&digest),
                                    QoS::AtMostOnce,
                                    false,
                                    body,
                                )
                                .await
                                .unwrap();
                        }
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("peer subscribed")
            .unwrap();
        peer
    }

    fn hold(&self, bundle: Vec<u8>) -> DesiredBundle {
        let parsed = Bundle::parse(&bundle).unwrap();
        let manifest = parsed.decode_manifest_unverified().unwrap();
        let digest = self
            .chunks
            .lock()
            .unwrap()
            .insert(bundle.clone(), Instant::now())
            .unwrap();
        DesiredBundle {
            digest,
            name: manifest.name,
            version: manifest.version.to_string(),
        }
    }

    async fn desire(&self, agent: &str, generation: u64, bundle: &DesiredBundle, key: &SecretKey) {
        let state = DesiredState {
            agent: agent.into(),
            generation,
            bundle: Some(bundle.clone()),
            rollout: Some(format!("r{generation}")),
            issued_at_ms: 0,
            key_sets: vec![],
        };
        let body = Envelope::new(
            "control-plane",
            generation,
            0,
            SignedDesiredState::sign(&state, key),
        )
        .encode();
        self.client
            .publish(topics::agent_desired(agent), QoS::AtLeastOnce, true, body)
            .await
            .unwrap();
    }

    /// Waits for an agent event matching `pred`, looking at history first.
    async fn wait_event(&self, agent: &str, pred: impl Fn(&EventKind) -> bool) -> EventKind {
        let mut rx = self.seen.subscribe();
        let matches = |s: &Seen| match s {
            Seen::Telemetry(a, _, Telemetry::Event(e)) if a == agent && pred(&e.kind) => {
                Some(e.kind.clone())
            }
            _ => None,
        };
        if let Some(found) = self.history.lock().unwrap().iter().find_map(&matches) {
            return found;
        }
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let item = rx.recv().await.expect("peer is alive");
                if let Some(found) = matches(&item) {
                    return found;
                }
            }
        })
        .await
        .expect("expected event within 60 s")
    }

    /// Waits for an agent's offline presence: its clean goodbye, or the Last Will the broker
    /// publishes when its connection ends uncleanly.
    async fn wait_will(&self, agent: &str) {
        let mut rx = self.seen.subscribe();
        let is_will =
            |s: &Seen| matches!(s, Seen::Presence(a, Presence::Offline { .. }) if a == agent);
        if self.history.lock().unwrap().iter().any(is_will) {
            return;
        }
        tokio::time::timeout(Duration::from_secs(60), async {
            while !is_will(&rx.recv().await.expect("peer is alive")) {}
        })
        .await
        .expect("will within 60 s");
    }

    fn events(&self, agent: &str) -> Vec<EventKind> {
        self.history
            .lock()
            .unwrap()
            .iter()
            .filter_map(|s| match s {
                Seen::Telemetry(a, _, Telemetry::Event(e)) if a == agent => Some(e.kind.clone()),
                _ => None,
            })
            .collect()
    }

    fn telemetry_seqs(&self, agent: &str) -> Vec<u64> {
        self.history
            .lock()
            .unwrap()
            .iter()
            .filter_map(|s| match s {
                Seen::Telemetry(a, seq, _) if a == agent => Some(*seq),
                _ => None,
            })
            .collect()
    }
}

/// A running in-process agent.
struct RunningAgent {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    api: SocketAddr,
}

impl RunningAgent {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }

    /// Ends the agent abruptly, as a crash would: no drain, no offline message.
    async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let response = reqwest::get(format!("http://{}{path}", self.api))
            .await
            .unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let client = reqwest::Client::new();
        let response = client
            .post(format!("http://{}{path}", self.api))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }
}

struct Setup {
    keys: TestKeys,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let keys = TestKeys::default();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("publisher.pub"),
            keys.publisher.public().to_pem().unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("cp.pub"),
            keys.control_plane.public().to_pem().unwrap(),
        )
        .unwrap();
        Self { keys, dir }
    }

    fn start_agent(&self, id: &str, broker_port: u16, api_port: u16) -> RunningAgent {
        self.start_agent_with(id, broker_port, api_port, |_| {})
    }

    fn start_agent_with(
        &self,
        id: &str,
        broker_port: u16,
        api_port: u16,
        adjust: impl FnOnce(&mut AgentConfig),
    ) -> RunningAgent {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let mut config = AgentConfig {
            id: id.to_owned(),
            labels: BTreeMap::from([("site".to_owned(), "lab".to_owned())]),
            data_dir: self.dir.path().join(id),
            ..AgentConfig::default()
        };
        config.broker.url = format!("mqtt://127.0.0.1:{broker_port}");
        config.trust.publishers = vec![self.dir.path().join("publisher.pub")];
        config.trust.control_plane = Some(self.dir.path().join("cp.pub"));
        config.api.listen = SocketAddr::from(([127, 0, 0, 1], api_port));
        config.heartbeat_secs = 1;
        adjust(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let result = flotilla_agent::agent::run(config, async {
                let _ = stopped.await;
            })
            .await;
            if let Err(e) = &result {
                tracing::error!(error = format!("{e:#}"), "agent stopped with an error");
            }
            result
        });
        RunningAgent {
            stop: Some(stop),
            task,
            api: SocketAddr::from(([127, 0, 0, 1], api_port)),
        }
    }
}

fn is_active(version: &str) -> impl Fn(&EventKind) -> bool + '_ {
    move |k| matches!(k, EventKind::Active { version: v, .. } if v == version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_installs_desired_bundle_and_serves_it() {
    let setup = Setup::new();
    let (port, _broker) = broker::start_broker();
    let peer = Peer::start(port).await;
    let agent = setup.start_agent("edge-1", port, free_port());
    // The API is up before the agent reports that it started.
    peer.wait_event("edge-1", |k| {
        matches!(k, EventKind::Started { active: None })
    })
    .await;

    let (status, _) = agent.get("/v2/health/ready").await;
    assert_eq!(status, 503, "no model yet");

    let v1 = peer.hold(pack_signed("tiny-bert-embed", &setup.keys.publisher));
    peer.desire("edge-1", 1, &v1, &setup.keys.control_plane)
        .await;
    peer.wait_event("edge-1", is_active("1.0.0")).await;

    let kinds = peer.events("edge-1");
    let order: Vec<&str> = kinds
        .iter()
        .filter_map(|k| match k {
            EventKind::Downloading { .. } => Some("downloading"),
            EventKind::Verifying => Some("verifying"),
            EventKind::Staged => Some("staged"),
            EventKind::SelfTestPassed => Some("self_test_passed"),
            EventKind::Active { .. } => Some("active"),
            _ => None,
        })
        .collect();
    let first = |name| order.iter().position(|n| *n == name).unwrap();
    assert!(first("downloading") < first("verifying"), "{order:?}");
    assert!(
        first("verifying") < first("staged") && first("staged") < first("self_test_passed"),
        "{order:?}"
    );
    assert!(first("self_test_passed") < first("active"), "{order:?}");

    let (status, body) = agent
        .post(
            "/v1/embed",
            serde_json::json!({"inputs": ["hello world", "今天天气很好"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(agent.get("/v2/health/ready").await.0, 200);

    agent.stop().await;
    // A clean stop publishes the offline presence with the session of the birth.
    peer.wait_will("edge-1").await;
    let presences: Vec<Presence> = peer
        .history
        .lock()
        .unwrap()
        .iter()
        .filter_map(|s| match s {
            Seen::Presence(a, p) if a == "edge-1" => Some(p.clone()),
            _ => None,
        })
        .collect();
    let last = presences.last().expect("presence seen");
    assert!(matches!(last, Presence::Offline { .. }), "{presences:?}");
    assert!(presences
        .iter()
        .any(|p| matches!(p, Presence::Online(b) if b.session == last.session())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_signed_by_another_key_is_ignored_and_reported() {
    let setup = Setup::new();
    let (port, _broker) = broker::start_broker();
    let peer = Peer::start(port).await;
    let agent = setup.start_agent("edge-2", port, free_port());
    peer.wait_event("edge-2", |k| matches!(k, EventKind::Started { .. }))
        .await;

    let bundle = peer.hold(pack_signed("tiny-mlp-raw", &setup.keys.publisher));
    // A cleared retained state (the control plane forgot the id) is not a bad message: the
    // first rejection below must be the impostor's.
    peer.client
        .publish(
            topics::agent_desired("edge-2"),
            QoS::AtLeastOnce,
            true,
            Vec::new(),
        )
        .await
        .unwrap();
    let impostor = SecretKey::from_seed([77; 32]);
    peer.desire("edge-2", 1, &bundle, &impostor).await;
    let kind = peer
        .wait_event("edge-2", |k| {
            matches!(k, EventKind::DesiredStateRejected { .. })
        })
        .await;
    let EventKind::DesiredStateRejected { reason } = kind else {
        unreachable!()
    };
    assert!(reason.contains("unknown key"), "{reason}");
    assert_eq!(
        agent.get("/v2/health/ready").await.0,
        503,
        "nothing was installed"
    );

    // The genuine key still works afterwards.
    peer.desire("edge-2", 2, &bundle, &setup.keys.control_plane)
        .await;
    peer.wait_event("edge-2", is_active("1.0.0")).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_self_test_keeps_the_old_model_serving() {
    let setup = Setup::new();
    let (port, _broker) = broker::start_broker();
    let peer = Peer::start(port).await;
    let agent = setup.start_agent("edge-3", port, free_port());

    let good = peer.hold(pack_signed("tiny-bert-embed", &setup.keys.publisher));
    peer.desire("edge-3", 1, &good, &setup.keys.control_plane)
        .await;
    peer.wait_event("edge-3", is_active("1.0.0")).await;

    let bad = peer.hold(pack_signed_with(
        "tiny-bert-selftest-fail",
        &setup.keys.publisher,
        |d| set_release(d, "2.0.0", 2),
    ));
    peer.desire("edge-3", 2, &bad, &setup.keys.control_plane)
        .await;
    let failed = peer
        .wait_event("edge-3", |k| matches!(k, EventKind::InstallFailed { .. }))
        .await;
    assert!(
        matches!(&failed, EventKind::InstallFailed { stage, .. } if stage == "self_test"),
        "{failed:?}"
    );
    assert!(peer
        .events("edge-3")
        .iter()
        .any(|k| matches!(k, EventKind::SelfTestFailed { .. })));

    let (status, body) = agent.get("/v2/models/tiny-bert-embed").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.to_string().contains("1.0.0"), "{body}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_chunks_are_refetched_and_restart_resumes_the_download() {
    let setup = Setup::new();
    let (port, _broker) = broker::start_broker();
    let peer = Peer::start(port).await;
    let api_port = free_port();

    let bundle = pack_signed_chunked("tiny-bert-embed", &setup.keys.publisher, 16384);
    let total = Bundle::parse(&bundle)
        .unwrap()
        .decode_manifest_unverified()
        .unwrap()
        .chunks
        .len();
    let wanted = peer.hold(bundle);
    peer.corrupt.lock().unwrap().extend([0, 3]);
    *peer.answer_budget.lock().unwrap() = Some(8);

    let agent = setup.start_agent("edge-4", port, api_port);
    peer.desire("edge-4", 1, &wanted, &setup.keys.control_plane)
        .await;
    peer.wait_event(
        "edge-4",
        |k| matches!(k, EventKind::Downloading { received, .. } if *received >= 4),
    )
    .await;
    agent.crash().await;
    // The crashed agent's connection task is the last holder of its state database; once the
    // broker publishes its will, the task is gone and the data directory can be reopened.
    peer.wait_will("edge-4").await;
    let before_restart = peer.requested.lock().unwrap().len();
    assert_eq!(before_restart, 8);

    *peer.answer_budget.lock().unwrap() = None;
    let agent = setup.start_agent("edge-4", port, api_port);
    peer.wait_event("edge-4", is_active("1.0.0")).await;
    let requested = peer.requested.lock().unwrap().clone();
    let after: Vec<u32> = requested[before_restart..].to_vec();
    let held_before: Vec<u32> = requested[..before_restart]
        .iter()
        .copied()
        .filter(|i| *i != 0 && *i != 3)
        .collect();
    assert!(after.len() < total, "resumed, not restarted: {after:?}");
    for i in &held_before {
        assert!(
            !after.contains(i),
            "chunk {i} was already verified on disk: {after:?}"
        );
    }
    assert!(
        after.contains(&0) && after.contains(&3),
        "corrupted chunks fetched again: {after:?}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_buffered_while_offline_arrives_in_order_without_gaps() {
    let setup = Setup::new();
    let (port, broker) = broker::start_broker();
    let peer = Peer::start(broker.direct_port()).await;
    let agent = setup.start_agent("edge-5", port, free_port());

    let mut rx = peer.seen.subscribe();
    let wait_seq = |rx: &mut broadcast::Receiver<Seen>, at_least: u64| {
        let mut rx = rx.resubscribe();
        async move {
            tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    if let Ok(Seen::Telemetry(a, seq, _)) = rx.recv().await {
                        if a == "edge-5" && seq >= at_least {
                            return seq;
                        }
                    }
                }
            })
            .await
            .expect("telemetry arrives")
        }
    };
    let first = wait_seq(&mut rx, 1).await;
    broker.partition();
    // A span of time, not an event, is the point here: heartbeats (one a second) pile up in the
    // outbox while the agent is cut off.
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.heal();
    wait_seq(&mut rx, first + 4).await;

    let mut seqs = peer.telemetry_seqs("edge-5");
    seqs.sort_unstable();
    seqs.dedup();
    let expected: Vec<u64> = (seqs[0]..=*seqs.last().unwrap()).collect();
    assert_eq!(seqs, expected, "no gaps");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_provider_that_cannot_run_degrades_to_cpu_in_events_heartbeats_and_metrics() {
    let Ok(library) = onnxruntime::library() else {
        // Fails with the reason unless FLOTILLA_SKIP_ORT=1.
        assert!(onnxruntime::runtime().is_none());
        return;
    };
    let setup = Setup::new();
    let (port, _broker) = broker::start_broker();
    let peer = Peer::start(port).await;
    let agent = setup.start_agent_with("edge-gpu", port, free_port(), |config| {
        config.inference.onnxruntime_library = Some(library);
        // The PyPI wheel has no CUDA provider: asking for it must not pass for CUDA.
        config.inference.gpu_providers = Some(vec![flotilla_agent::runtime::Provider::Cuda]);
    });
    let v1 = peer.hold(pack_signed("tiny-bert-embed", &setup.keys.publisher));
    peer.desire("edge-gpu", 1, &v1, &setup.keys.control_plane)
        .await;
    peer.wait_event("edge-gpu", is_active("1.0.0")).await;

    let degraded = peer
        .wait_event("edge-gpu", |k| matches!(k, EventKind::Degraded { .. }))
        .await;
    let EventKind::Degraded { cause } = degraded else {
        unreachable!()
    };
    assert!(
        cause.contains("ort/cuda") && cause.contains("running on ort/cpu"),
        "{cause}"
    );

    // Requests are served meanwhile, on the CPU provider, and every report says so.
    let (status, body) = agent
        .post("/v1/embed", serde_json::json!({"inputs": "hello world"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, meta) = agent.get("/v2/models/tiny-bert-embed").await;
    assert_eq!(meta["parameters"]["backend"], "ort", "{meta}");
    assert_eq!(meta["parameters"]["provider"], "cpu", "{meta}");
    assert!(meta["parameters"]["degraded"]
        .as_str()
        .unwrap()
        .contains("cuda"));
    let metrics = reqwest::get(format!("http://{}/metrics", agent.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"flotilla_model_engine{model="tiny-bert-embed",version="1.0.0",backend="ort",provider="cpu"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"flotilla_model_degraded{model="tiny-bert-embed",version="1.0.0"} 1"#)
    );

    let heartbeat = tokio::time::timeout(Duration::from_secs(30), async {
        let mut rx = peer.seen.subscribe();
        loop {
            if let Seen::Telemetry(a, _, Telemetry::Heartbeat(h)) = rx.recv().await.unwrap() {
                if a == "edge-gpu" && h.active.is_some() {
                    return h;
                }
            }
        }
    })
    .await
    .expect("a heartbeat with the model");
    let active = heartbeat.active.unwrap();
    assert_eq!(active.backend, flotilla_shared::manifest::Backend::Ort);
    assert_eq!(active.provider, "cpu");
    assert!(
        matches!(&heartbeat.health, Health::Degraded { cause: c } if c.contains("cuda")),
        "{:?}",
        heartbeat.health
    );
    let reported = peer
        .events("edge-gpu")
        .into_iter()
        .filter(|k| matches!(k, EventKind::Degraded { .. }))
        .count();
    assert_eq!(reported, 1, "one event per cause, not one per heartbeat");
    agent.stop().await;
}
