//! The real control plane (embedded rumqttd, sled, REST API) with real agents in-process:
//! staged rollouts that complete and that roll back, restart resumption on an external
//! broker, auth, bad input, malformed MQTT traffic, bundles leaving memory when no longer
//! downloaded, a backup restored onto a new server, and new agents joining at their peers'
//! release.

use std::time::{Duration, Instant};

#[path = "../../agent/tests/support/broker.rs"]
mod broker;

use flotilla_agent::config::BrokerConfig;
use flotilla_control_plane::server::config::BrokerTls;
use flotilla_control_plane::server::hub::Admission;
use flotilla_shared::wire::{
    topics, Chunk, ChunkPart, ChunkRequest, Envelope, Event, EventKind, Presence, SignedReport,
    Telemetry,
};
use flotilla_tests::fleet::{
    one_wave, traffic, Fleet, Mosquitto, ADMIN_TOKEN, OPERATOR_TOKEN, VIEWER_TOKEN,
};
use flotilla_tests::{
    agent_report, birth, pack_signed, pack_signed_at, pack_signed_with, run_flotilla, set_release,
};
use rumqttc::{AsyncClient, QoS};
use serde_json::{json, Value};

const MODEL: &str = "tiny-bert-embed";

fn release(version: &str, sequence: u64, fleet: &Fleet) -> Vec<u8> {
    pack_signed_with(MODEL, &fleet.keys.publisher, |dir| {
        set_release(dir, version, sequence)
    })
}

/// Four agents over two sites and two hardware classes, all on v1.
async fn fleet_on_v1() -> (Fleet, Vec<&'static str>) {
    on_v1(Fleet::start().await).await
}

async fn on_v1(mut fleet: Fleet) -> (Fleet, Vec<&'static str>) {
    let agents = vec!["edge-a1", "edge-a2", "edge-b1", "edge-b2"];
    for (id, site, hw) in [
        ("edge-a1", "a", "cpu"),
        ("edge-a2", "a", "gpu"),
        ("edge-b1", "b", "cpu"),
        ("edge-b2", "b", "gpu"),
    ] {
        fleet.start_agent(id, &[("site", site), ("hw", hw)]);
    }
    fleet.wait_online(&agents).await;
    fleet.upload(release("1.0.0", 1, &fleet)).await;
    fleet.roll_out_everywhere("1.0.0").await;
    for agent in &agents {
        fleet.wait_version(agent, "1.0.0").await;
    }
    (fleet, agents)
}

async fn served_version(fleet: &Fleet, agent: &str) -> String {
    let api = fleet.agent_api(agent);
    let body: Value = reqwest::get(format!("http://{api}/v2/models/{MODEL}"))
        .await
        .expect("agent API answers")
        .json()
        .await
        .expect("model metadata is JSON");
    body["versions"][0].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_wave_rollout_completes_and_every_agent_serves_the_new_version() {
    let (fleet, agents) = fleet_on_v1().await;
    fleet.upload(release("2.0.0", 2, &fleet)).await;
    let load = traffic(agents.iter().map(|a| fleet.agent_api(a)).collect());

    let id = fleet
        .rollout(json!({
            "bundle": format!("{MODEL}@2.0.0"),
            "selector": "site in (a, b)",
            "waves": [
                { "size": { "count": 1 }, "bake_secs": 1 },
                { "size": { "percent": 50 }, "bake_secs": 1 },
                { "size": { "percent": 100 }, "bake_secs": 1 },
            ],
            "stratify_by": "hw",
            "gates": { "max_error_rate": 0.01, "max_p99_ratio": 50.0 },
        }))
        .await;
    let done = fleet
        .wait_rollout(&id, |r| {
            r["state"] == "completed" || r["state"] == "rolled_back"
        })
        .await;
    let _ = load.send(());
    assert_eq!(done["state"], "completed", "{done:#}");
    let waves = done["waves"].as_array().unwrap();
    assert_eq!(waves.len(), 3);
    assert_eq!(
        waves[0]["agents"].as_array().unwrap().len(),
        1,
        "canary of one"
    );
    for wave in waves {
        assert_eq!(wave["outcome"]["outcome"], "passed", "{wave:#}");
        let comparison = &wave["comparison"];
        assert!(
            comparison["new"]["requests"].as_u64().unwrap() > 0,
            "the new version's metrics are shown per wave: {comparison:#}"
        );
    }

    for agent in &agents {
        fleet.wait_version(agent, "2.0.0").await;
        assert_eq!(
            served_version(&fleet, agent).await,
            "2.0.0",
            "{agent} serves v2"
        );
    }
    // Every agent's telemetry arrived in sequence, and the event log has the story.
    let (_, summary) = fleet.get("/fleet", Some(VIEWER_TOKEN)).await;
    assert_eq!(summary["telemetry_missing"], 0, "{summary:#}");
    assert_eq!(summary["by_version"][format!("{MODEL}@2.0.0")], 4);
    let (_, events) = fleet
        .get(
            &format!("/events?rollout={id}&limit=1000"),
            Some(VIEWER_TOKEN),
        )
        .await;
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    for kind in [
        "rollout_started",
        "rollout_wave_passed",
        "rollout_completed",
        "active",
    ] {
        assert!(kinds.contains(&kind), "no {kind} event in {kinds:?}");
    }
    let metrics = metrics_text(&fleet).await;
    assert!(
        metrics.contains("flotilla_rollouts{state=\"completed\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("flotilla_chunk_bytes_total"), "{metrics}");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_completes_through_an_external_mosquitto_broker() {
    let mosquitto = Mosquitto::start();
    let fleet = Fleet::start_with(|c| {
        c.mqtt.external = Some(BrokerConfig {
            url: mosquitto.url(),
            ..BrokerConfig::default()
        })
    })
    .await;
    assert!(fleet.server().mqtt_addr.is_none(), "no embedded broker");
    let (fleet, agents) = on_v1(fleet).await;
    fleet.upload(release("2.0.0", 2, &fleet)).await;
    let id = fleet
        .rollout(json!({
            "bundle": format!("{MODEL}@2.0.0"),
            "selector": "",
            "waves": [
                { "size": { "count": 1 }, "bake_secs": 1 },
                { "size": { "percent": 100 }, "bake_secs": 1 },
            ],
        }))
        .await;
    let done = fleet
        .wait_rollout(&id, |r| {
            r["state"] == "completed" || r["state"] == "rolled_back"
        })
        .await;
    assert_eq!(done["state"], "completed", "{done:#}");
    for agent in &agents {
        fleet.wait_version(agent, "2.0.0").await;
        assert_eq!(served_version(&fleet, agent).await, "2.0.0");
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reach_the_embedded_broker_over_tls() {
    let files = broker::tls_files();
    let tls_port = flotilla_tests::free_port();
    let mut fleet = Fleet::start_with(|c| {
        c.mqtt.tls = Some(BrokerTls {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], tls_port)),
            cert_file: files.server_cert.clone(),
            key_file: files.server_key.clone(),
        })
    })
    .await;
    fleet.start_agent_with("edge-tls", &[("site", "a")], |config| {
        config.broker.url = format!("mqtts://127.0.0.1:{tls_port}");
        config.broker.ca_file = Some(files.ca.clone());
        config.broker.client_cert = Some(files.client_cert.clone());
        config.broker.client_key = Some(files.client_key.clone());
    });
    fleet.wait_online(&["edge-tls"]).await;
    fleet.upload(release("1.0.0", 1, &fleet)).await;
    fleet.roll_out_everywhere("1.0.0").await;
    assert_eq!(served_version(&fleet, "edge-tls").await, "1.0.0");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_breach_rolls_back_exactly_the_updated_agents() {
    let (fleet, agents) = fleet_on_v1().await;
    fleet.upload(release("2.0.0", 2, &fleet)).await;
    let mut on_v1 = std::collections::BTreeMap::new();
    for agent in &agents {
        let (_, view) = fleet
            .get(&format!("/agents/{agent}"), Some(VIEWER_TOKEN))
            .await;
        on_v1.insert(agent.to_string(), view["desired"]["generation"].clone());
    }
    let load = traffic(agents.iter().map(|a| fleet.agent_api(a)).collect());

    // No model answers in a microsecond: the canary's p99 breaches the gate for certain.
    let id = fleet
        .rollout(json!({
            "bundle": format!("{MODEL}@2.0.0"),
            "selector": "",
            "waves": [
                { "size": { "count": 1 }, "bake_secs": 2 },
                { "size": { "percent": 100 }, "bake_secs": 1 },
            ],
            "gates": { "max_p99_ms": 0.001 },
        }))
        .await;
    let done = fleet
        .wait_rollout(&id, |r| {
            r["state"] == "rolled_back" || r["state"] == "completed"
        })
        .await;
    let _ = load.send(());
    assert_eq!(done["state"], "rolled_back", "{done:#}");
    let failure = &done["failure"];
    assert_eq!(failure["gate"], "p99_ms", "{failure:#}");
    assert!(failure["value"].as_f64().unwrap() > 0.001, "{failure:#}");

    let canary: Vec<String> = done["waves"][0]["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(canary.len(), 1);
    for agent in &agents {
        let view = fleet.wait_version(agent, "1.0.0").await;
        assert_eq!(served_version(&fleet, agent).await, "1.0.0");
        let phase = done["agents"][agent]["phase"]["phase"].as_str().unwrap();
        let desired = view["desired"]["bundle"]["version"].as_str();
        if canary.contains(&agent.to_string()) {
            assert_eq!(phase, "rolled_back", "{agent}");
            assert_eq!(desired, Some("1.0.0"), "{agent} sent back to v1");
        } else {
            assert_eq!(phase, "waiting", "{agent} was never sent v2");
            assert_eq!(
                view["desired"]["generation"],
                on_v1[&agent.to_string()],
                "{agent} got no desired state beyond v1: {view:#}"
            );
        }
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_failing_its_self_test_stops_at_the_canary_with_the_reason() {
    let (fleet, _agents) = fleet_on_v1().await;
    let bad = pack_signed("tiny-bert-selftest-fail", &fleet.keys.publisher);
    fleet.upload(bad).await;
    let id = fleet
        .rollout(json!({
            "bundle": "tiny-bert-selftest-fail@1.0.0",
            "selector": "",
            "waves": [
                { "size": { "count": 1 }, "bake_secs": 1 },
                { "size": { "percent": 100 }, "bake_secs": 1 },
            ],
        }))
        .await;
    let done = fleet
        .wait_rollout(&id, |r| {
            r["state"] == "rolled_back" || r["state"] == "completed"
        })
        .await;
    assert_eq!(done["state"], "rolled_back", "{done:#}");
    assert_eq!(done["failure"]["gate"], "self_test_failures");
    assert_eq!(done["failure"]["wave"], 0, "stopped at the canary");
    assert_eq!(
        done["waves"][1]["started_ms"],
        Value::Null,
        "wave 1 never started"
    );
    let (_, events) = fleet
        .get("/events?kind=self_test_failed", Some(VIEWER_TOKEN))
        .await;
    assert!(
        !events["events"].as_array().unwrap().is_empty(),
        "the agent's reason is in the event log"
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_resumes_the_rollout_where_it_was() {
    let (mut fleet, agents) = fleet_on_v1().await;
    fleet.upload(release("2.0.0", 2, &fleet)).await;
    let id = fleet
        .rollout(json!({
            "bundle": format!("{MODEL}@2.0.0"),
            "selector": "",
            "waves": [
                { "size": { "count": 1 }, "bake_secs": 3 },
                { "size": { "percent": 100 }, "bake_secs": 1 },
            ],
        }))
        .await;
    // Stop in the canary's bake, then come back on the same data directory, as an ordinary
    // client of the broker the first server embedded.
    fleet
        .wait_rollout(&id, |r| r["status"]["stage"] == "baking")
        .await;
    fleet.stop_server().await;
    fleet.restart_server_on_broker().await;
    let (_, resumed) = fleet
        .get(&format!("/rollouts/{id}"), Some(VIEWER_TOKEN))
        .await;
    assert_eq!(resumed["state"], "wave", "resumed mid-rollout: {resumed:#}");
    assert_eq!(resumed["current_wave"], 0);
    let done = fleet
        .wait_rollout(&id, |r| {
            r["state"] == "completed" || r["state"] == "rolled_back"
        })
        .await;
    assert_eq!(done["state"], "completed", "{done:#}");
    for agent in &agents {
        fleet.wait_version(agent, "2.0.0").await;
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_sent_while_the_server_was_away_arrives_when_it_returns() {
    let (mut fleet, agents) = fleet_on_v1().await;
    let mut seen_before = Vec::new();
    for agent in &agents {
        let (_, record) = fleet
            .get(&format!("/agents/{agent}"), Some(VIEWER_TOKEN))
            .await;
        seen_before.push(record["last_seq"].as_u64().expect("telemetry seen"));
    }
    fleet.stop_server().await;

    // Nobody listens now. Every agent keeps heartbeating, and one restarts, which it reports
    // in a `started` event; the broker would acknowledge all of it and hand it to no one.
    fleet.stop_agent("edge-a1").await;
    let api = fleet.start_agent("edge-a1", &[("site", "a"), ("hw", "cpu")]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("http://{api}/v2/health/live"))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "restarted agent never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    fleet.restart_server_on_broker().await;
    let started = fleet
        .wait_api("/events?agent=edge-a1&kind=started&limit=100", |page| {
            page["events"].as_array().is_some_and(|e| e.len() >= 2)
        })
        .await;
    assert_eq!(
        started["events"].as_array().unwrap().len(),
        2,
        "{started:#}"
    );
    fleet.wait_online(&agents).await;
    for (agent, before) in agents.iter().zip(seen_before) {
        let record = fleet
            .wait_api(&format!("/agents/{agent}"), |r| {
                r["last_seq"].as_u64() > Some(before + 2)
            })
            .await;
        assert_eq!(record["telemetry_missing"], 0, "{agent}: {record:#}");
    }
    let (_, summary) = fleet.get("/fleet", Some(VIEWER_TOKEN)).await;
    assert_eq!(summary["telemetry_missing"], 0, "{summary:#}");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_missing_tokens_low_roles_and_bad_input_with_reasons() {
    let fleet = Fleet::start_with(|c| c.max_upload_bytes = 1 << 20).await;

    let (status, body) = fleet.get("/agents", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = fleet.get("/agents", Some("not-a-token")).await;
    assert_eq!(status, 401);
    let (status, body) = fleet
        .post("/rollouts", b"{}".to_vec(), Some(VIEWER_TOKEN))
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("needs operator"),
        "{body}"
    );
    let (status, _) = fleet
        .post("/bundles", vec![1, 2, 3], Some(VIEWER_TOKEN))
        .await;
    assert_eq!(status, 403);
    // What a client checks before a long upload, since refusals come before the body is read.
    let (status, caller) = fleet.get("/whoami", Some(VIEWER_TOKEN)).await;
    assert_eq!(status, 200, "{caller}");
    assert_eq!(
        caller,
        json!({"name": "viewer", "role": "viewer", "max_upload_bytes": 1 << 20})
    );

    // Bundles: garbage, unsigned, signed by an untrusted key, too large.
    let (status, body) = fleet
        .post("/bundles", b"not a bundle".to_vec(), Some(OPERATOR_TOKEN))
        .await;
    assert_eq!(status, 400, "{body}");
    let untrusted = pack_signed(MODEL, &flotilla_shared::SecretKey::from_seed([99; 32]));
    let (status, body) = fleet
        .post("/bundles", untrusted, Some(OPERATOR_TOKEN))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("refused"),
        "{body}"
    );
    let (status, body) = fleet
        .post("/bundles", vec![0; (1 << 20) + 1], Some(OPERATOR_TOKEN))
        .await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("upload limit"),
        "{body}"
    );

    // Rollout specs: each refusal names its reason.
    let cases = [
        (
            json!({"bundle": "nope@1.0.0", "selector": "", "waves": [{"size": {"count": 1}, "bake_secs": 1}]}),
            "unknown bundle",
        ),
        (
            json!({"bundle": "nope@1.0.0", "selector": "", "waves": []}),
            "wave",
        ),
        (
            json!({"bundle": "nope@1.0.0", "selector": "", "waves": [{"size": {"percent": 120}, "bake_secs": 1}]}),
            "percentage",
        ),
        (
            json!({"bundle": "nope@1.0.0", "selector": "", "wavez": []}),
            "unknown field",
        ),
        (
            json!({"bundle": "nope@1.0.0", "selector": "site in (", "waves": [{"size": {"count": 1}, "bake_secs": 1}]}),
            "selector",
        ),
    ];
    for (spec, reason) in cases {
        let (status, body) = fleet
            .post(
                "/rollouts",
                spec.to_string().into_bytes(),
                Some(OPERATOR_TOKEN),
            )
            .await;
        assert_eq!(status, 400, "{spec}: {body}");
        let message = body["error"].as_str().unwrap();
        assert!(message.contains(reason), "{spec}: {message}");
    }
    let (status, body) = fleet
        .get("/agents?selector=a%20in%20(", Some(VIEWER_TOKEN))
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = fleet.get("/rollouts/none", Some(VIEWER_TOKEN)).await;
    assert_eq!(status, 404);
    let (status, _) = fleet
        .post("/rollouts/none/pause", vec![], Some(OPERATOR_TOKEN))
        .await;
    assert_eq!(status, 404);
    let (status, _) = fleet.get("/events?limit=0", Some(VIEWER_TOKEN)).await;
    assert_eq!(status, 400);

    // The server made its signing key private, and publishes the public half.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = fleet.server_dir().join("control-plane.key");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }
    let (status, pem) = fleet.get("/server/key", Some(VIEWER_TOKEN)).await;
    assert_eq!(status, 200);
    let published = flotilla_shared::PublicKey::from_pem(pem.as_str().unwrap()).unwrap();
    assert_eq!(published, fleet.server().public_key);

    // The OpenAPI document lists every route and needs no token.
    let (status, doc) = fleet.get("/openapi.json", None).await;
    assert_eq!(status, 200);
    for path in [
        "/api/v1/agents",
        "/api/v1/agents/{id}",
        "/api/v1/fleet",
        "/api/v1/bundles",
        "/api/v1/rollouts",
        "/api/v1/rollouts/{id}/{action}",
        "/api/v1/events",
        "/api/v1/pending-agents",
        "/api/v1/pending-agents/{id}/accept",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from OpenAPI"
        );
    }
    let _ = ADMIN_TOKEN;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_matching_nothing_and_overlapping_rollouts_are_refused() {
    let (fleet, _agents) = fleet_on_v1().await;
    fleet.upload(release("2.0.0", 2, &fleet)).await;
    let spec = |selector: &str| {
        json!({
            "bundle": format!("{MODEL}@2.0.0"),
            "selector": selector,
            "waves": [{ "size": { "count": 1 }, "bake_secs": 600 }],
        })
        .to_string()
        .into_bytes()
    };
    let (status, body) = fleet
        .post("/rollouts", spec("site=nowhere"), Some(OPERATOR_TOKEN))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("matches no agent"),
        "{body}"
    );

    let (status, first) = fleet
        .post("/rollouts", spec("site=a"), Some(OPERATOR_TOKEN))
        .await;
    assert_eq!(status, 201, "{first}");
    let (status, body) = fleet
        .post("/rollouts", spec("hw=cpu"), Some(OPERATOR_TOKEN))
        .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("is active on edge-a1"), "{message}");

    // Operators steer it; a viewer cannot, an admin can forget only offline agents.
    let id = first["id"].as_str().unwrap();
    let (status, _) = fleet
        .post(&format!("/rollouts/{id}/pause"), vec![], Some(VIEWER_TOKEN))
        .await;
    assert_eq!(status, 403);
    let (status, paused) = fleet
        .post(
            &format!("/rollouts/{id}/pause"),
            br#"{"reason": "looking at it"}"#.to_vec(),
            Some(OPERATOR_TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["state"], "paused");
    let (status, body) = fleet
        .post(
            &format!("/rollouts/{id}/pause"),
            vec![],
            Some(OPERATOR_TOKEN),
        )
        .await;
    assert_eq!(status, 409, "pausing twice conflicts: {body}");
    let (status, aborted) = fleet
        .post(
            &format!("/rollouts/{id}/abort"),
            vec![],
            Some(OPERATOR_TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{aborted}");
    assert_eq!(aborted["state"], "aborted");
    let (status, _) = fleet
        .post("/rollouts", spec("hw=cpu"), Some(OPERATOR_TOKEN))
        .await;
    assert_eq!(status, 201, "an aborted rollout holds no agents");

    let forget = |token| {
        let client = reqwest::Client::new();
        let url = format!("http://{}/api/v1/agents/edge-b2", fleet.server().api_addr);
        async move {
            client
                .delete(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(forget(OPERATOR_TOKEN).await, 403);
    assert_eq!(
        forget(ADMIN_TOKEN).await,
        409,
        "online agents are not forgotten"
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_foreign_mqtt_messages_are_counted_and_dropped() {
    let fleet = Fleet::start().await;
    let (client, mut events) = AsyncClient::new(fleet.mqtt_options("intruder"), 16);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });

    client
        .publish(
            topics::agent_state("edge-x"),
            QoS::AtLeastOnce,
            false,
            b"garbage".to_vec(),
        )
        .await
        .unwrap();
    let offline = Presence::Offline { session: 1 };
    let foreign = agent_report("edge-y", &topics::agent_state("edge-x"), 1, offline);
    client
        .publish(
            topics::agent_state("edge-x"),
            QoS::AtLeastOnce,
            false,
            foreign,
        )
        .await
        .unwrap();
    client
        .publish(
            "flotilla/v1/bundles/nothex/requests",
            QoS::AtLeastOnce,
            false,
            b"x".to_vec(),
        )
        .await
        .unwrap();
    let summary = fleet
        .wait_api("/fleet", |s| {
            s["dropped_messages"]["malformed"].as_u64() >= Some(1)
                && s["dropped_messages"]["foreign"].as_u64() >= Some(1)
        })
        .await;
    assert_eq!(summary["agents"], 0, "no agent was made up: {summary:#}");
    let (status, _) = fleet.get("/agents", Some(VIEWER_TOKEN)).await;
    assert_eq!(status, 200, "the server still answers");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_leaves_memory_once_nobody_downloads_it_and_is_served_again_after() {
    let fleet = Fleet::start_with(|config| config.bundle_hold_secs = 2).await;
    let bundle = release("1.0.0", 1, &fleet);
    let size = bundle.len() as u64;
    let digest = flotilla_shared::Bundle::parse(&bundle).unwrap().digest();
    fleet.upload(bundle).await;
    let held = |text: &str| {
        let value = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
        };
        (
            value("flotilla_held_bundles "),
            value("flotilla_held_bundle_bytes "),
        )
    };
    assert_eq!(
        held(&metrics_text(&fleet).await),
        (0, 0),
        "nothing held before a request"
    );

    // A downloader's header request, as an agent sends it.
    let (client, mut events) = AsyncClient::new(fleet.mqtt_options("edge-z"), 16);
    let (headers_tx, mut headers) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish)) = event {
                if let Ok(chunk) = Envelope::<Chunk>::decode(&publish.payload) {
                    let _ = headers_tx.send(chunk.body.part);
                }
            }
        }
    });
    client
        .subscribe(topics::bundle_chunks(&digest), QoS::AtMostOnce)
        .await
        .unwrap();
    let ask_header = |seq: u64| {
        let request = ChunkRequest {
            agent: "edge-z".into(),
            header: true,
            chunks: vec![],
        };
        let body = Envelope::new("edge-z", seq, 0, request).encode();
        let client = client.clone();
        async move {
            client
                .publish(
                    topics::bundle_requests(&digest),
                    QoS::AtLeastOnce,
                    false,
                    body,
                )
                .await
                .unwrap()
        }
    };
    // The subscription may not be in place yet: ask until the answer comes.
    let mut seq = 0;
    let first = loop {
        seq += 1;
        ask_header(seq).await;
        match tokio::time::timeout(Duration::from_millis(500), headers.recv()).await {
            Ok(part) => break part.unwrap(),
            Err(_) => continue,
        }
    };
    assert_eq!(first, ChunkPart::Header);
    assert_eq!(
        held(&metrics_text(&fleet).await),
        (1, size),
        "held while downloaded"
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    while held(&metrics_text(&fleet).await) != (0, 0) {
        assert!(Instant::now() < deadline, "still held long after its hold");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Asked for again, it is read from the store and served as before.
    ask_header(seq + 1).await;
    let again = tokio::time::timeout(Duration::from_secs(10), headers.recv()).await;
    assert_eq!(again.expect("answered").unwrap(), ChunkPart::Header);
    assert_eq!(held(&metrics_text(&fleet).await), (1, size));
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_joins_at_the_release_completed_for_agents_like_it() {
    let (mut fleet, _) = fleet_on_v1().await;
    fleet.upload(release("2.0.0", 2, &fleet)).await;
    let v2 = fleet.rollout(one_wave("2.0.0", "site=a", 0)).await;
    fleet.wait_rollout(&v2, |r| r["state"] == "completed").await;

    // Replacement devices: one at each site, after the rollouts that reached their peers.
    fleet.start_agent("edge-a3", &[("site", "a"), ("hw", "cpu")]);
    fleet.start_agent("edge-b3", &[("site", "b"), ("hw", "cpu")]);
    fleet.wait_version("edge-a3", "2.0.0").await;
    fleet.wait_version("edge-b3", "1.0.0").await;
    let (_, page) = fleet
        .get("/events?kind=agent_assigned&limit=10", Some(VIEWER_TOKEN))
        .await;
    let mut assigned: Vec<(&str, &str)> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["agent"].as_str().unwrap(),
                e["detail"]["from_rollout"].as_str().unwrap(),
            )
        })
        .collect();
    assigned.sort_unstable();
    assert_eq!(
        assigned,
        [
            ("edge-a3", v2.as_str()),
            ("edge-b3", "tiny-bert-embed-1.0.0-1")
        ]
    );

    // One joining while a rollout that would reach it runs is given the release that rollout
    // would replace, and stays there when the rollout is aborted.
    fleet.upload(release("3.0.0", 3, &fleet)).await;
    let v3 = fleet.rollout(one_wave("3.0.0", "site=b", 3600)).await;
    fleet
        .wait_rollout(&v3, |r| r["status"]["stage"] == "baking")
        .await;
    // Lists narrow to what is active, or to the newest.
    let ids = |list: &Value| -> Vec<String> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, all) = fleet.get("/rollouts", Some(VIEWER_TOKEN)).await;
    assert_eq!(ids(&all).len(), 3);
    let (_, active) = fleet.get("/rollouts?active=true", Some(VIEWER_TOKEN)).await;
    assert_eq!(ids(&active), std::slice::from_ref(&v3));
    let (_, newest) = fleet.get("/rollouts?limit=2", Some(VIEWER_TOKEN)).await;
    assert_eq!(ids(&newest), [v3.clone(), v2.clone()]);
    let (_, older) = fleet
        .get(
            &format!("/rollouts?limit=2&before={v2}"),
            Some(VIEWER_TOKEN),
        )
        .await;
    assert_eq!(ids(&older), ["tiny-bert-embed-1.0.0-1"]);
    let (status, body) = fleet
        .get("/rollouts?before=no-such-rollout", Some(VIEWER_TOKEN))
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = fleet.get("/rollouts?limit=0", Some(VIEWER_TOKEN)).await;
    assert_eq!(status, 400, "{body}");
    let api = format!("http://{}", fleet.server().api_addr);
    let list = |flags: &[&str]| {
        let mut args = vec!["rollout", "list"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--server", &api, "--token", VIEWER_TOKEN]);
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        let (ok, table, stderr) = run_flotilla(&args);
        assert!(ok, "{stderr}");
        table
    };
    let table = list(&["--active"]);
    assert!(table.contains(&v3) && !table.contains(&v2), "{table}");
    let table = list(&["--before", &v3, "--limit", "1"]);
    assert!(table.contains(&v2) && !table.contains(&v3), "{table}");

    fleet.start_agent("edge-b4", &[("site", "b"), ("hw", "gpu")]);
    fleet.wait_version("edge-b4", "1.0.0").await;
    fleet.steer(&v3, "abort").await;
    fleet.wait_rollout(&v3, |r| r["state"] == "aborted").await;
    let (_, stayed) = fleet.get("/agents/edge-b4", Some(VIEWER_TOKEN)).await;
    assert_eq!(
        stayed["desired"]["bundle"]["version"], "1.0.0",
        "{stayed:#}"
    );

    // One joining while a rollout runs that then completes follows it to the new release.
    let v31 = fleet.rollout(one_wave("3.0.0", "site=b", 8)).await;
    fleet
        .wait_rollout(&v31, |r| r["status"]["stage"] == "baking")
        .await;
    fleet.start_agent("edge-b5", &[("site", "b"), ("hw", "cpu")]);
    fleet.wait_version("edge-b5", "1.0.0").await;
    fleet
        .wait_rollout(&v31, |r| r["state"] == "completed")
        .await;
    fleet.wait_version("edge-b5", "3.0.0").await;
    let (_, page) = fleet
        .get(
            "/events?kind=agent_assigned&agent=edge-b5",
            Some(VIEWER_TOKEN),
        )
        .await;
    let steps: Vec<(&str, bool)> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["detail"]["from_rollout"].as_str().unwrap(),
                e["detail"]["follows"] == true,
            )
        })
        .collect();
    assert_eq!(
        steps,
        [("tiny-bert-embed-1.0.0-1", false), (v31.as_str(), true)]
    );
    fleet.shutdown().await;
}

/// Starts a rollout of `version` to `selector` (which matches the two `agents`) whose canary
/// bakes for an hour before the second wave, and waits until the canary bakes. Returns the
/// rollout and the agent left waiting for the second wave.
async fn roll_out_behind_a_canary(
    fleet: &Fleet,
    version: &str,
    selector: &str,
    agents: [&'static str; 2],
) -> (String, &'static str) {
    let id = fleet
        .rollout(json!({
            "bundle": format!("{MODEL}@{version}"),
            "selector": selector,
            "waves": [
                { "size": { "count": 1 }, "bake_secs": 3600 },
                { "size": { "percent": 100 }, "bake_secs": 0 },
            ],
        }))
        .await;
    let view = fleet
        .wait_rollout(&id, |r| r["status"]["stage"] == "baking")
        .await;
    let waiting = agents
        .into_iter()
        .find(|agent| view["agents"][*agent]["wave"] == 1)
        .expect("one agent waits in the second wave");
    (id, waiting)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_a_rollout_holds_is_not_moved_by_another_rollout_completing() {
    let mut fleet = Fleet::start().await;
    for (version, sequence) in [("2.0.0", 2), ("3.0.0", 3)] {
        fleet.upload(release(version, sequence, &fleet)).await;
    }
    fleet.start_agent("edge-c0", &[("site", "c")]);
    fleet.wait_online(&["edge-c0"]).await;
    let release_c = fleet.rollout(one_wave("2.0.0", "site=c", 20)).await;
    fleet
        .wait_rollout(&release_c, |r| r["status"]["stage"] == "baking")
        .await;

    // Two agents join while it bakes, and a rollout for them starts whose second wave waits
    // on an hour-long canary.
    for id in ["edge-c1", "edge-c2"] {
        fleet.start_agent(id, &[("site", "c"), ("tier", "x")]);
    }
    fleet.wait_online(&["edge-c1", "edge-c2"]).await;
    let (hold, held) =
        roll_out_behind_a_canary(&fleet, "3.0.0", "tier=x", ["edge-c1", "edge-c2"]).await;
    let (_, first) = fleet
        .get(&format!("/rollouts/{release_c}"), Some(VIEWER_TOKEN))
        .await;
    assert_eq!(
        first["state"], "wave",
        "the first rollout ended too soon: {first:#}"
    );

    // The first rollout completes: its release is now the one for the held agent's labels,
    // but the rollout holding it decides what it runs.
    fleet
        .wait_rollout(&release_c, |r| r["state"] == "completed")
        .await;
    fleet.wait_version("edge-c0", "2.0.0").await;
    let (_, record) = fleet
        .get(&format!("/agents/{held}"), Some(VIEWER_TOKEN))
        .await;
    assert!(record["desired"].is_null(), "{record:#}");
    let assigned = format!("/events?kind=agent_assigned&agent={held}");
    let (_, page) = fleet.get(&assigned, Some(VIEWER_TOKEN)).await;
    assert_eq!(page["events"], serde_json::json!([]), "{page:#}");

    // Once that rollout is aborted, nothing holds it and it joins the release.
    fleet.steer(&hold, "abort").await;
    fleet.wait_version(held, "2.0.0").await;
    let (_, page) = fleet.get(&assigned, Some(VIEWER_TOKEN)).await;
    assert_eq!(
        page["events"][0]["detail"]["from_rollout"],
        release_c.as_str(),
        "{page:#}"
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_bundle_is_neither_sent_on_by_its_rollout_nor_handed_to_new_agents() {
    let mut fleet = Fleet::start().await;
    for (id, site) in [("edge-a1", "a"), ("edge-b1", "b"), ("edge-b2", "b")] {
        fleet.start_agent(id, &[("site", site)]);
    }
    fleet.wait_online(&["edge-a1", "edge-b1", "edge-b2"]).await;
    // Valid for another 45 seconds (tiny-bert-embed is valid for 365 days from packing): time
    // enough for both rollouts to reach their agents on a loaded machine.
    let expires_at = flotilla_control_plane::server::unix_ms() / 1000 + 45;
    let bundle = pack_signed_at(
        MODEL,
        &fleet.keys.publisher,
        |dir| set_release(dir, "1.0.0", 1),
        expires_at - 365 * 86_400,
    );
    let record = fleet.upload(bundle).await;
    assert_eq!(record["expires_at"], expires_at, "{record:#}");
    let release = fleet.rollout(one_wave("1.0.0", "site=a", 0)).await;
    fleet
        .wait_rollout(&release, |r| r["state"] == "completed")
        .await;
    // At site b, a canary bakes for an hour before the second wave.
    let (slow, waiting) =
        roll_out_behind_a_canary(&fleet, "1.0.0", "site=b", ["edge-b1", "edge-b2"]).await;

    // Once the bundle has expired, agents would refuse it as new. The slow rollout stops
    // rather than send it on, and may not be resumed.
    let paused = fleet.wait_rollout(&slow, |r| r["state"] == "paused").await;
    assert!(flotilla_control_plane::server::unix_ms() / 1000 > expires_at);
    let reason = paused["status"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(&format!("{MODEL}@1.0.0 expired at ")),
        "{paused:#}"
    );
    let (_, record) = fleet
        .get(&format!("/agents/{waiting}"), Some(VIEWER_TOKEN))
        .await;
    assert!(record["desired"].is_null(), "{record:#}");
    let (status, body) = fleet
        .post(
            &format!("/rollouts/{slow}/resume"),
            b"{}".to_vec(),
            Some(OPERATOR_TOKEN),
        )
        .await;
    assert_eq!(status, 409, "{body:#}");
    assert!(
        body["error"].as_str().unwrap().contains("cannot resume"),
        "{body:#}"
    );
    fleet.steer(&slow, "rollback").await;

    // A device joining site a is not handed the release it would only refuse.
    fleet.start_agent("edge-a2", &[("site", "a")]);
    let page = fleet
        .wait_api("/events?kind=release_expired&agent=edge-a2", |p| {
            p["events"].as_array().is_some_and(|e| !e.is_empty())
        })
        .await;
    assert_eq!(
        page["events"][0]["detail"]["from_rollout"],
        release.as_str(),
        "{page:#}"
    );
    let (_, record) = fleet.get("/agents/edge-a2", Some(VIEWER_TOKEN)).await;
    assert!(record["desired"].is_null(), "{record:#}");

    // Said once: coming back online does not log it again.
    fleet.stop_agent("edge-a2").await;
    fleet
        .wait_api("/agents/edge-a2", |a| a["online"] == false)
        .await;
    fleet.start_agent("edge-a2", &[("site", "a")]);
    fleet
        .wait_api("/agents/edge-a2", |a| a["online"] == true)
        .await;
    assert_eq!(events_of(&fleet, "agent_online", "edge-a2").await, 2);
    assert_eq!(events_of(&fleet, "release_expired", "edge-a2").await, 1);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_log_is_trimmed_to_its_newest_events() {
    let mut fleet = Fleet::start_with(|config| config.max_events = 3).await;
    for id in ["edge-1", "edge-2", "edge-3", "edge-4"] {
        fleet.start_agent(id, &[("site", "a")]);
    }
    fleet
        .wait_online(&["edge-1", "edge-2", "edge-3", "edge-4"])
        .await;
    let page = fleet
        .wait_api("/events?limit=100", |p| {
            p["events"].as_array().is_some_and(|e| e.len() <= 3)
        })
        .await;
    let ids: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    assert!(ids.first() > Some(&1), "the oldest went: {page:#}");
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "the newest stay, in order: {page:#}"
    );
    fleet.shutdown().await;
}

/// A client of `GET /api/v1/events/stream`: its server-sent events as (id, name, data).
struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    async fn open(url: &str, last_event_id: Option<&str>) -> Self {
        let mut request = reqwest::Client::new().get(url).bearer_auth(VIEWER_TOKEN);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("the server answers");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "{response:?}"
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped); `None` once the stream ends.
    async fn next(&mut self) -> Option<(u64, String, Value)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(|v| v.trim_start().to_owned())
                };
                let (Some(id), Some(name), Some(data)) =
                    (field("id:"), field("event:"), field("data:"))
                else {
                    continue; // a comment
                };
                let data = serde_json::from_str(&data).expect("JSON data");
                return Some((id.parse().expect("numeric id"), name, data));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.response.chunk())
                .await
                .expect("an event within 30 s")
                .expect("the stream reads")?;
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_log_streams_as_server_sent_events_and_resumes() {
    let mut fleet = Fleet::start().await;
    let url = format!(
        "http://{}/api/v1/events/stream?kind=agent_online",
        fleet.server().api_addr
    );
    let mut stream = EventStream::open(&url, None).await;
    fleet.start_agent("edge-1", &[("site", "a")]);
    let (first, name, data) = stream.next().await.expect("an event");
    assert_eq!(
        (name.as_str(), &data["agent"]),
        ("agent_online", &json!("edge-1"))
    );
    assert_eq!(data["id"], first);
    drop(stream);

    // What was logged while no one listened comes first to a client that resumes.
    fleet.start_agent("edge-2", &[("site", "a")]);
    fleet.wait_online(&["edge-2"]).await;
    let mut resumed = EventStream::open(&url, Some(&first.to_string())).await;
    let (next, _, data) = resumed.next().await.expect("an event");
    assert!(next > first, "{next} after {first}");
    assert_eq!(data["agent"], "edge-2", "{data:#}");

    let refused = reqwest::Client::new()
        .get(&url)
        .bearer_auth(VIEWER_TOKEN)
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let (status, _) = fleet
        .get("/events/stream?after=soon", Some(VIEWER_TOKEN))
        .await;
    assert_eq!(status, 400);

    // Stopping the server ends open streams instead of waiting on them.
    tokio::time::timeout(Duration::from_secs(30), fleet.shutdown())
        .await
        .expect("the server stops with a stream open");
    assert_eq!(resumed.next().await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_assignment_off_a_new_agent_waits_for_a_rollout() {
    let fleet = Fleet::start_with(|config| config.assign_new_agents = false).await;
    let (mut fleet, _) = on_v1(fleet).await;
    fleet.start_agent("edge-c1", &[("site", "c"), ("hw", "cpu")]);
    fleet.wait_online(&["edge-c1"]).await;
    let (_, record) = fleet.get("/agents/edge-c1", Some(VIEWER_TOKEN)).await;
    assert!(record["desired"].is_null(), "{record:#}");
    assert!(record["active"].is_null(), "{record:#}");
    fleet.shutdown().await;
}

/// What an operator sees of the server's state: bundles, rollouts, agents' records and the
/// event log, with what changes by itself (presence, heartbeats) left out.
async fn state_of(fleet: &Fleet) -> Value {
    let get = |path: &'static str| async move { fleet.get(path, Some(VIEWER_TOKEN)).await.1 };
    let agents: Vec<Value> = get("/agents")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            json!([
                a["id"],
                a["labels"],
                a["capabilities"],
                a["first_seen_ms"],
                a["active"],
                a["desired"]
            ])
        })
        .collect();
    json!({
        "bundles": get("/bundles").await,
        "rollouts": get("/rollouts").await,
        "agents": agents,
        "events": get("/events?limit=1000").await["events"],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restored_onto_a_new_server_carries_the_fleet_on() {
    let (mut fleet, agents) = fleet_on_v1().await;
    fleet.upload(release("2.0.0", 2, &fleet)).await;
    let api = format!("http://{}", fleet.server().api_addr);
    let file = fleet.dir.path().join("fleet.backup");
    let backup = |token: &str| {
        run_flotilla(&[
            "backup".as_ref(),
            "--out".as_ref(),
            file.as_os_str(),
            "--server".as_ref(),
            api.as_ref(),
            "--token".as_ref(),
            token.as_ref(),
        ])
    };

    let (ok, _, stderr) = backup(OPERATOR_TOKEN);
    assert!(!ok && stderr.contains("HTTP 403"), "admin only: {stderr}");
    assert!(!file.exists());
    let (ok, stdout, stderr) = backup(ADMIN_TOKEN);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("backed up 4 agents, 2 bundles"), "{stdout}");
    let (ok, stdout, stderr) = run_flotilla(&[
        "server".as_ref(),
        "restore".as_ref(),
        file.as_os_str(),
        "--check".as_ref(),
    ]);
    assert!(
        ok && stdout.contains("is a whole backup"),
        "{stdout}{stderr}"
    );
    let cut = fleet.dir.path().join("cut.backup");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 1]).unwrap();
    let (ok, _, stderr) = run_flotilla(&[
        "server".as_ref(),
        "restore".as_ref(),
        cut.as_os_str(),
        "--check".as_ref(),
    ]);
    assert!(!ok && stderr.contains("does not check out"), "{stderr}");

    // Nothing changes by itself once every agent is on v1 and idle, so this is the state the
    // backup holds.
    let before = state_of(&fleet).await;

    // The server and its data directory are lost; the backup and the key were kept.
    fleet.stop_server().await;
    let restored = fleet.dir.path().join("restored");
    let restore = || {
        run_flotilla(&[
            "server".as_ref(),
            "restore".as_ref(),
            file.as_os_str(),
            "--data-dir".as_ref(),
            restored.as_os_str(),
        ])
    };
    let (ok, stdout, stderr) = restore();
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("copy the old data directory's control-plane.key"),
        "{stdout}"
    );
    let (ok, _, stderr) = restore();
    assert!(
        !ok && stderr.contains("already holds a database"),
        "{stderr}"
    );
    for key in ["control-plane.key", "control-plane.pub"] {
        std::fs::copy(fleet.server_dir().join(key), restored.join(key)).unwrap();
    }
    fleet.restart_server_on_broker_in(restored).await;

    let after = state_of(&fleet).await;
    assert_eq!(after["bundles"], before["bundles"]);
    assert_eq!(after["rollouts"], before["rollouts"]);
    assert_eq!(after["agents"], before["agents"]);
    let old_events = before["events"].as_array().unwrap();
    assert_eq!(
        after["events"].as_array().unwrap()[..old_events.len()],
        old_events[..],
        "the event log is restored as it was"
    );

    // The new server's desired states are signed by the same key and numbered on from the
    // restored ones, so the agents follow it into the next release.
    fleet.roll_out_everywhere("2.0.0").await;
    for agent in &agents {
        fleet.wait_version(agent, "2.0.0").await;
    }
    let events = state_of(&fleet).await["events"].clone();
    let ids: Vec<u64> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]) && ids.len() > old_events.len(),
        "new events follow the restored ones: {ids:?}"
    );
    fleet.shutdown().await;
}

async fn metrics_text(fleet: &Fleet) -> String {
    reqwest::get(format!("http://{}/metrics", fleet.server().api_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The identity key an agent of `fleet` made in its data directory.
fn identity_of(fleet: &Fleet, agent: &str) -> flotilla_shared::SecretKey {
    let path = fleet.agent_data_dir(agent).join("identity.key");
    flotilla_control_plane::keyfile::load_secret(&path).expect("the agent made its key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_embedded_broker_only_an_agent_s_own_key_speaks_for_it() {
    let mut fleet = Fleet::start().await;
    fleet.upload(release("2.0.0", 2, &fleet)).await;
    let agents = ["edge-k0", "edge-k1"];
    for id in agents {
        fleet.start_agent(id, &[("site", "k")]);
    }
    fleet.wait_online(&agents).await;
    for id in agents {
        let (_, agent) = fleet
            .get(&format!("/agents/{id}"), Some(VIEWER_TOKEN))
            .await;
        let registered = hex::encode(identity_of(&fleet, id).public().to_bytes());
        assert_eq!(agent["identity"], registered, "registered on first birth");
    }
    let (rollout, waiting) = roll_out_behind_a_canary(&fleet, "2.0.0", "site=k", agents).await;
    let canary = agents.into_iter().find(|a| *a != waiting).unwrap();
    let (_, before) = fleet
        .get(&format!("/agents/{canary}"), Some(VIEWER_TOKEN))
        .await;
    let session = before["session"].as_u64().unwrap();

    // An intruder on the broker says the baking canary stopped serving, which fails the gate.
    let (client, mut events) = AsyncClient::new(fleet.mqtt_options("intruder"), 16);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let state = topics::agent_state(canary);
    let telemetry = topics::agent_telemetry(canary);
    let stopped = Telemetry::Event(Event {
        session,
        rollout: Some(rollout.clone()),
        digest: None,
        kind: EventKind::Started { active: None },
    });
    let unsigned = Envelope::new(canary, 1_000_001, 0, stopped.clone()).encode();
    for (topic, payload) in [
        // Under a key of its own, as a birth naming that key, and unsigned.
        (
            &telemetry,
            agent_report(canary, &telemetry, 1_000_000, stopped.clone()),
        ),
        (
            &state,
            agent_report(
                canary,
                &state,
                0,
                birth(canary, session + 1, &[("site", "x")]),
            ),
        ),
        (&telemetry, unsigned),
    ] {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    fleet
        .wait_api("/fleet", |s| {
            s["dropped_messages"]["unauthenticated"].as_u64() >= Some(3)
        })
        .await;
    let refused = fleet
        .wait_api(
            &format!("/events?kind=agent_key_refused&agent={canary}"),
            |e| e["events"].as_array().is_some_and(|e| !e.is_empty()),
        )
        .await;
    let offered = flotilla_tests::agent_key(canary).public().id().0.to_hex();
    assert_eq!(
        refused["events"][0]["detail"]["offered"], offered,
        "{refused:#}"
    );
    let (_, after) = fleet
        .get(&format!("/agents/{canary}"), Some(VIEWER_TOKEN))
        .await;
    assert_eq!(after["session"], session, "{after:#}");
    assert_eq!(after["labels"]["site"], "k", "{after:#}");
    assert!(after["last_seq"].as_u64() < Some(1_000_000), "{after:#}");
    let (_, view) = fleet
        .get(&format!("/rollouts/{rollout}"), Some(VIEWER_TOKEN))
        .await;
    assert_eq!(view["status"]["stage"], "baking", "{view:#}");

    // The same report under the canary's own key is believed: it is what moves the gate.
    let envelope = Envelope::new(canary, 2_000_000, 0, stopped).encode();
    let genuine = SignedReport::seal(&telemetry, envelope, &identity_of(&fleet, canary));
    client
        .publish(&telemetry, QoS::AtLeastOnce, false, genuine)
        .await
        .unwrap();
    fleet
        .wait_rollout(&rollout, |r| {
            r["state"] == "rolling_back" || r["state"] == "rolled_back"
        })
        .await;
    fleet.shutdown().await;
}

/// How many events of `kind` the log holds about `agent` (up to 100).
async fn events_of(fleet: &Fleet, kind: &str, agent: &str) -> usize {
    let path = format!("/events?kind={kind}&agent={agent}");
    let (status, page) = fleet.get(&path, Some(VIEWER_TOKEN)).await;
    assert_eq!(status, 200, "{page:#}");
    page["events"].as_array().map_or(0, Vec::len)
}

/// Accepts the key `key_id` that `agent` offers, as the holder of `token`.
async fn accept(fleet: &Fleet, agent: &str, key_id: &str, token: &str) -> (u16, Value) {
    let body = serde_json::to_vec(&json!({ "key_id": key_id })).unwrap();
    let path = format!("/pending-agents/{agent}/accept");
    fleet.post(&path, body, Some(token)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_key_was_approved_ahead_joins_at_once_under_admission_by_acceptance() {
    let mut fleet = Fleet::start_with(|c| c.admission = Admission::Accept).await;
    // Provisioning made the device's key before it ever connected.
    let pair =
        flotilla_control_plane::keyfile::generate("identity", &fleet.agent_data_dir("edge-p"))
            .unwrap();
    let (status, body) = accept(&fleet, "edge-p", &pair.id, OPERATOR_TOKEN).await;
    assert_eq!(status, 403, "{body:#}");
    let (status, body) = accept(&fleet, "edge-p", &pair.id, ADMIN_TOKEN).await;
    assert_eq!(status, 202, "{body:#}");
    assert_eq!(body, json!({ "id": "edge-p", "key_id": pair.id }));
    let (_, approved) = fleet.get("/approved-agents", Some(VIEWER_TOKEN)).await;
    assert_eq!(approved, json!([{ "id": "edge-p", "key_id": pair.id }]));

    fleet.start_agent("edge-p", &[("site", "p")]);
    fleet.wait_online(&["edge-p"]).await;
    let (_, pending) = fleet.get("/pending-agents", Some(VIEWER_TOKEN)).await;
    assert_eq!(pending, json!([]), "it never waited");
    let (_, approved) = fleet.get("/approved-agents", Some(VIEWER_TOKEN)).await;
    assert_eq!(approved, json!([]), "the approval is used up");
    let (_, joined) = fleet
        .get(
            "/events?kind=agent_accepted&agent=edge-p",
            Some(VIEWER_TOKEN),
        )
        .await;
    assert_eq!(
        joined["events"][0]["detail"]["approved_ahead"], true,
        "{joined:#}"
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_device_is_heard_again_once_an_admin_accepts_its_new_key() {
    let mut fleet = Fleet::start().await;
    fleet.start_agent("edge-r", &[("site", "r")]);
    fleet.wait_online(&["edge-r"]).await;
    let first = identity_of(&fleet, "edge-r").public();
    fleet.stop_agent("edge-r").await;
    fleet
        .wait_api("/agents/edge-r", |a| a["online"] == false)
        .await;

    // The device loses its data and comes back with a new key: it is not believed.
    std::fs::remove_dir_all(fleet.agent_data_dir("edge-r")).unwrap();
    fleet.start_agent("edge-r", &[("site", "r")]);
    let refused = fleet
        .wait_api("/events?kind=agent_key_refused&agent=edge-r", |e| {
            e["events"].as_array().is_some_and(|e| !e.is_empty())
        })
        .await;
    let second = identity_of(&fleet, "edge-r").public();
    let second_id = second.id().0.to_hex();
    assert_eq!(
        refused["events"][0]["detail"]["offered"], second_id,
        "{refused:#}"
    );
    let (_, agent) = fleet.get("/agents/edge-r", Some(VIEWER_TOKEN)).await;
    assert_eq!(agent["online"], false, "{agent:#}");
    assert_eq!(
        agent["identity"],
        hex::encode(first.to_bytes()),
        "{agent:#}"
    );
    let (_, pending) = fleet.get("/pending-agents", Some(VIEWER_TOKEN)).await;
    assert_eq!(pending[0]["id"], "edge-r", "{pending:#}");
    assert_eq!(pending[0]["key_id"], second_id, "{pending:#}");
    assert_eq!(
        pending[0]["registered_key_id"],
        first.id().0.to_hex(),
        "{pending:#}"
    );

    // Accepting it takes an admin and the key it offers; the device then joins anew.
    let (status, body) = accept(&fleet, "edge-r", &second_id, OPERATOR_TOKEN).await;
    assert_eq!(status, 403, "{body:#}");
    let (status, body) = accept(&fleet, "edge-r", &first.id().0.to_hex(), ADMIN_TOKEN).await;
    assert_eq!(
        status, 409,
        "the registered key is registered already: {body:#}"
    );
    let (status, body) = accept(&fleet, "edge-r", "12ab", ADMIN_TOKEN).await;
    assert_eq!(status, 400, "{body:#}");
    let (status, body) = accept(&fleet, "edge-r", &second_id, ADMIN_TOKEN).await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["identity"], hex::encode(second.to_bytes()), "{body:#}");
    fleet.wait_online(&["edge-r"]).await;
    let (_, pending) = fleet.get("/pending-agents", Some(VIEWER_TOKEN)).await;
    assert_eq!(pending, json!([]));
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_admission_by_acceptance_a_new_agent_waits_for_an_admin() {
    let mut fleet = Fleet::start_with(|c| c.admission = Admission::Accept).await;
    fleet.start_agent("edge-n", &[("site", "n")]);
    let key_id = |fleet: &Fleet| identity_of(fleet, "edge-n").public().id().0.to_hex();
    let pending = fleet
        .wait_api("/pending-agents", |p| p[0]["id"] == "edge-n")
        .await;
    assert_eq!(pending[0]["key_id"], key_id(&fleet), "{pending:#}");
    assert_eq!(pending[0]["registered_key_id"], Value::Null, "{pending:#}");
    assert_eq!(pending[0]["labels"]["site"], "n", "{pending:#}");
    let summary = fleet
        .wait_api("/fleet", |s| {
            // Its heartbeats are not heard either.
            s["dropped_messages"]["unauthenticated"].as_u64() >= Some(3)
        })
        .await;
    assert_eq!(summary["agents"], 0, "{summary:#}");
    assert_eq!(summary["pending_agents"], 1, "{summary:#}");
    let (status, _) = fleet.get("/agents/edge-n", Some(VIEWER_TOKEN)).await;
    assert_eq!(status, 404);
    assert_eq!(events_of(&fleet, "agent_pending", "edge-n").await, 1);

    let (status, body) = fleet
        .get("/pending-agents?limit=0", Some(VIEWER_TOKEN))
        .await;
    assert_eq!(status, 400, "{body:#}");

    // An impostor's birth for the same id takes its place. Accepting the key the admin saw
    // (the device's) cannot admit the impostor: it approves the device's key ahead, so a
    // client that keeps replacing the pending birth cannot keep the device out either.
    let (client, mut events) = AsyncClient::new(fleet.mqtt_options("impostor"), 16);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let state = topics::agent_state("edge-n");
    let forged = agent_report("edge-n", &state, 0, birth("edge-n", 99, &[("site", "n")]));
    client
        .publish(&state, QoS::AtLeastOnce, false, forged)
        .await
        .unwrap();
    let impostor = flotilla_tests::agent_key("edge-n").public().id().0.to_hex();
    fleet
        .wait_api("/pending-agents", |p| p[0]["key_id"] == impostor)
        .await;
    let device = key_id(&fleet);
    let (status, body) = accept(&fleet, "edge-n", &device, ADMIN_TOKEN).await;
    assert_eq!(status, 202, "{body:#}");
    let (_, pending) = fleet.get("/pending-agents", Some(VIEWER_TOKEN)).await;
    assert_eq!(pending[0]["key_id"], impostor, "{pending:#}");
    assert_eq!(pending[0]["approved_key_id"], device, "{pending:#}");
    let (status, _) = fleet.get("/agents/edge-n", Some(VIEWER_TOKEN)).await;
    assert_eq!(status, 404, "the impostor is not let in");

    // The device connects again: its key registers it, and the impostor's birth is dropped.
    fleet.stop_agent("edge-n").await;
    fleet.start_agent("edge-n", &[("site", "n")]);
    fleet.wait_online(&["edge-n"]).await;
    let (_, pending) = fleet.get("/pending-agents", Some(VIEWER_TOKEN)).await;
    assert_eq!(pending, json!([]), "{pending:#}");
    let agent = fleet
        .wait_api("/agents/edge-n", |a| a["online"] == true)
        .await;
    let registered = hex::encode(identity_of(&fleet, "edge-n").public().to_bytes());
    assert_eq!(agent["identity"], registered);
    let (status, body) = accept(&fleet, "edge-n", &device, ADMIN_TOKEN).await;
    assert_eq!(status, 409, "registered: {body:#}");
    fleet
        .wait_api("/agents/edge-n", |a| a["last_heartbeat_ms"].is_u64())
        .await;
    fleet.shutdown().await;
}

/// The retained desired state a new subscriber to `agent`'s topic gets, if any, within 2 s.
async fn retained_desired(fleet: &Fleet, agent: &str) -> Option<Vec<u8>> {
    let (client, mut events) = AsyncClient::new(fleet.mqtt_options("desired-reader"), 16);
    client
        .subscribe(topics::agent_desired(agent), QoS::AtLeastOnce)
        .await
        .unwrap();
    let read = async {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) if p.retain => {
                    return p.payload.to_vec();
                }
                Ok(_) => {}
                Err(e) => panic!("reader connection failed: {e}"),
            }
        }
    };
    let found = tokio::time::timeout(std::time::Duration::from_secs(2), read)
        .await
        .ok();
    let _ = client.disconnect().await;
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_an_agent_clears_its_retained_desired_state() {
    let mut fleet = Fleet::start().await;
    for (version, sequence) in [("1.0.0", 1), ("2.0.0", 2), ("3.0.0", 3)] {
        fleet.upload(release(version, sequence, &fleet)).await;
    }
    fleet.start_agent("edge-f", &[("site", "f")]);
    fleet.wait_online(&["edge-f"]).await;
    fleet.roll_out_everywhere("1.0.0").await;
    fleet.roll_out_everywhere("2.0.0").await;
    fleet.stop_agent("edge-f").await;
    fleet
        .wait_api("/agents/edge-f", |a| a["online"] == false)
        .await;
    assert!(
        retained_desired(&fleet, "edge-f").await.is_some(),
        "the broker keeps the state for the agent"
    );

    let (status, body) = fleet.delete("/agents/edge-f", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 204, "{body:#}");
    // The broker is told after the answer; a device taking the id later is told nothing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while retained_desired(&fleet, "edge-f").await.is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the retained state was never cleared"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // The device comes back with its store, which applied two generations: the server's new
    // count for it must still rise above them, or it would ignore the next release.
    fleet.start_agent("edge-f", &[("site", "f")]);
    fleet.wait_online(&["edge-f"]).await;
    fleet.roll_out_everywhere("3.0.0").await;
    fleet
        .wait_api("/agents/edge-f", |a| a["active"]["version"] == "3.0.0")
        .await;
    fleet.shutdown().await;
}
