//! Infrastructure restarts in the middle of a rollout, with real processes on Mosquitto: the
//! broker killed and started again on its port, and the control plane SIGKILLed during a bake
//! and started again on its data directory. The rollout carries on and nothing is lost.

use flotilla_tests::fleet::Mosquitto;
use flotilla_tests::procs::{release, Broker, Cluster, MODEL};
use serde_json::{json, Value};

const AGENTS: [&str; 3] = ["edge-1", "edge-2", "edge-3"];

/// A cluster on the broker at `url` with three agents on v1 and v2 uploaded; v2's digest.
async fn on_v1(url: &str) -> (Cluster, String) {
    let mut cluster = Cluster::external(url);
    for (id, hw) in AGENTS.iter().zip(["cpu", "gpu", "cpu"]) {
        cluster.start_agent(id, &[("site", "lab"), ("hw", hw)]);
    }
    cluster
        .install_everywhere(release(&cluster.keys, "1.0.0", 1, None), "1.0.0", &AGENTS)
        .await;
    let v2 = cluster
        .upload(release(&cluster.keys, "2.0.0", 2, None))
        .await;
    let digest = v2["digest"].as_str().expect("digest").to_owned();
    (cluster, digest)
}

fn two_waves(canary_bake: u64, rest_bake: u64) -> Value {
    json!({
        "bundle": format!("{MODEL}@2.0.0"),
        "selector": "",
        "waves": [
            { "size": { "count": 1 }, "bake_secs": canary_bake },
            { "size": { "percent": 100 }, "bake_secs": rest_bake },
        ],
        "install_timeout_secs": 120,
    })
}

async fn assert_all_serve_v2(cluster: &Cluster, digest: &str) {
    for agent in AGENTS {
        cluster.wait_served(agent, MODEL, "2.0.0").await;
        let record = cluster.wait_reported(agent, "2.0.0").await;
        let body = cluster.served(agent, MODEL).await.expect("serves a model");
        assert_eq!(
            body["parameters"]["digest"], digest,
            "{agent} serves the uploaded bundle"
        );
        assert_eq!(record["active"]["digest"], digest, "{record:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_rollout_loses_no_telemetry_and_the_rollout_completes() {
    let mut broker = Broker::start();
    let (cluster, digest) = on_v1(&broker.url()).await;
    let id = cluster.rollout(two_waves(1, 4)).await;
    cluster
        .wait_api(&format!("/rollouts/{id}"), "the second wave", |r| {
            r["current_wave"] == 1
        })
        .await;

    broker.kill();
    broker.restart();

    let done = cluster
        .wait_rollout_state(&id, &["completed", "rolled_back", "paused", "aborted"])
        .await;
    assert_eq!(done["state"], "completed", "{done:#}");
    assert_all_serve_v2(&cluster, &digest).await;
    cluster.wait_online(&AGENTS).await;

    // Telemetry waited in the agents' outboxes while the broker was away; none is missing.
    let (_, fleet) = cluster
        .get("/fleet", Some(flotilla_tests::fleet::VIEWER_TOKEN))
        .await;
    assert_eq!(
        fleet["telemetry_missing"],
        0,
        "{fleet:#}\n{}",
        cluster.logs()
    );
    for agent in AGENTS {
        let (_, record) = cluster
            .get(
                &format!("/agents/{agent}"),
                Some(flotilla_tests::fleet::VIEWER_TOKEN),
            )
            .await;
        assert_eq!(record["telemetry_missing"], 0, "{agent}: {record:#}");
        assert!(
            record["telemetry_received"].as_u64().unwrap_or(0) > 0,
            "{agent}: {record:#}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_killed_during_a_bake_resumes_the_rollout_where_it_was() {
    let mosquitto = Mosquitto::start();
    let (mut cluster, digest) = on_v1(&mosquitto.url()).await;
    let id = cluster.rollout(two_waves(6, 1)).await;
    let baking = cluster
        .wait_api(&format!("/rollouts/{id}"), "the canary baking", |r| {
            r["status"]["state"] == "wave"
                && r["status"]["index"] == 0
                && r["status"]["stage"] == "baking"
        })
        .await;
    let canary = baking["waves"][0]["agents"].clone();
    let canary_started = baking["waves"][0]["started_ms"].clone();

    cluster.server.kill();
    cluster.server.restart();

    let resumed = cluster
        .wait_api(
            &format!("/rollouts/{id}"),
            "the rollout after the restart",
            |_| true,
        )
        .await;
    let still_in_canary = resumed["current_wave"] == 0;
    let moved_on = resumed["current_wave"] == 1 || resumed["state"] == "completed";
    assert!(
        still_in_canary || moved_on,
        "after the restart the rollout is where it was: {resumed:#}"
    );
    assert_eq!(resumed["waves"][0]["agents"], canary, "the same canary");
    assert_eq!(
        resumed["waves"][0]["started_ms"], canary_started,
        "the canary wave was not started again: {resumed:#}"
    );

    let done = cluster
        .wait_rollout_state(&id, &["completed", "rolled_back", "paused", "aborted"])
        .await;
    assert_eq!(done["state"], "completed", "{done:#}");
    assert_eq!(done["waves"][0]["agents"], canary, "{done:#}");
    assert_all_serve_v2(&cluster, &digest).await;
    let (_, events) = cluster
        .get(
            &format!("/events?rollout={id}&kind=rollout_started&limit=100"),
            Some(flotilla_tests::fleet::VIEWER_TOKEN),
        )
        .await;
    let starts = events["events"].as_array().map_or(0, Vec::len);
    assert_eq!(
        starts, 1,
        "started once, resumed after the restart: {events:#}"
    );
}
