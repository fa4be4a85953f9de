//! Rollouts with real processes: `flotilla server` and `flotilla-agent run` children, through
//! Mosquitto or the embedded broker. A staged rollout completes, a gate breach rolls back only
//! the canary, an offline agent catches up when it returns, and the API refuses callers without
//! the role.

use flotilla_tests::fleet::{traffic, Mosquitto, ADMIN_TOKEN, OPERATOR_TOKEN, VIEWER_TOKEN};
use flotilla_tests::procs::{release, Cluster, MODEL};
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_wave_rollout_through_mosquitto_ends_with_every_agent_serving_the_new_version() {
    let mosquitto = Mosquitto::start();
    let mut cluster = Cluster::external(&mosquitto.url());
    let agents = ["edge-a1", "edge-a2", "edge-b1", "edge-b2"];
    for (id, site, hw) in [
        ("edge-a1", "a", "cpu"),
        ("edge-a2", "a", "gpu"),
        ("edge-b1", "b", "cpu"),
        ("edge-b2", "b", "gpu"),
    ] {
        cluster.start_agent(id, &[("site", site), ("hw", hw)]);
    }
    cluster
        .install_everywhere(release(&cluster.keys, "1.0.0", 1, None), "1.0.0", &agents)
        .await;
    let v2 = cluster
        .upload(release(&cluster.keys, "2.0.0", 2, None))
        .await;
    let v2_digest = v2["digest"]
        .as_str()
        .expect("upload names the digest")
        .to_owned();
    let load = traffic(agents.iter().map(|a| cluster.agent_api(a)).collect());

    let id = cluster
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
    let done = cluster
        .wait_rollout_state(&id, &["completed", "rolled_back", "paused", "aborted"])
        .await;
    let _ = load.send(());

    assert_eq!(done["state"], "completed", "{done:#}");
    let waves = done["waves"].as_array().expect("waves");
    assert_eq!(waves.len(), 3, "{done:#}");
    let sizes: Vec<usize> = waves
        .iter()
        .map(|w| w["agents"].as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(sizes[0], 1, "a canary of one: {sizes:?}");
    assert_eq!(
        sizes.iter().sum::<usize>(),
        4,
        "every agent in a wave: {sizes:?}"
    );
    for wave in waves {
        assert_eq!(wave["outcome"]["outcome"], "passed", "{wave:#}");
    }
    for agent in agents {
        cluster.wait_reported(agent, "2.0.0").await;
        let (version, digest) = cluster.served_release(agent).await;
        assert_eq!(version, "2.0.0", "{agent} serves the new version");
        assert_eq!(digest, v2_digest, "{agent} serves the uploaded bundle");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_breach_rolls_back_the_canary_and_leaves_the_others_untouched() {
    let mut cluster = Cluster::embedded();
    let agents = ["edge-1", "edge-2", "edge-3"];
    for id in agents {
        cluster.start_agent(id, &[("site", "lab")]);
    }
    let v1 = cluster
        .install_everywhere(release(&cluster.keys, "1.0.0", 1, None), "1.0.0", &agents)
        .await;
    let v1_digest = v1["digest"].as_str().expect("digest").to_owned();
    cluster
        .upload(release(&cluster.keys, "2.0.0", 2, None))
        .await;
    let before: Vec<Value> = {
        let mut out = Vec::new();
        for agent in agents {
            let (_, view) = cluster
                .get(&format!("/agents/{agent}"), Some(VIEWER_TOKEN))
                .await;
            out.push(view["desired"].clone());
        }
        out
    };
    let load = traffic(agents.iter().map(|a| cluster.agent_api(a)).collect());

    // No model answers within a microsecond: the canary's p99 breaches the gate for certain.
    let id = cluster
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
    let done = cluster
        .wait_rollout_state(&id, &["rolled_back", "completed", "paused", "aborted"])
        .await;
    let _ = load.send(());

    assert_eq!(done["state"], "rolled_back", "{done:#}");
    assert_eq!(done["failure"]["gate"], "p99_ms", "{done:#}");
    let canary: Vec<String> = done["waves"][0]["agents"]
        .as_array()
        .expect("wave agents")
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    assert_eq!(canary.len(), 1, "{done:#}");
    let canary = canary[0].clone();
    let canary_activated = cluster
        .events(&canary, "active")
        .await
        .iter()
        .any(|e| e["rollout"] == id.as_str());
    assert!(
        canary_activated,
        "the canary ran v2 before it was rolled back"
    );

    for (agent, desired_before) in agents.iter().zip(&before) {
        let view = cluster.wait_reported(agent, "1.0.0").await;
        let (version, digest) = cluster.served_release(agent).await;
        assert_eq!(version, "1.0.0", "{agent} serves v1 again");
        assert_eq!(digest, v1_digest, "{agent} serves the v1 bundle");
        let phase = &done["agents"][*agent]["phase"]["phase"];
        if *agent == canary {
            assert_eq!(phase, "rolled_back", "{agent}: {done:#}");
            assert_eq!(view["desired"]["bundle"]["version"], "1.0.0", "{view:#}");
        } else {
            assert_eq!(phase, "waiting", "{agent} was never sent v2: {done:#}");
            assert_eq!(
                &view["desired"], desired_before,
                "{agent} got no new desired state"
            );
            let touched = cluster
                .events(agent, "downloading")
                .await
                .iter()
                .any(|e| e["rollout"] == id.as_str());
            assert!(!touched, "{agent} never downloaded v2");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_offline_during_its_wave_is_unreachable_and_installs_when_it_returns() {
    let mut cluster = Cluster::embedded();
    let agents = ["edge-1", "edge-2", "edge-3"];
    for id in agents {
        cluster.start_agent(id, &[("site", "lab")]);
    }
    cluster
        .install_everywhere(release(&cluster.keys, "1.0.0", 1, None), "1.0.0", &agents)
        .await;
    cluster
        .upload(release(&cluster.keys, "2.0.0", 2, None))
        .await;

    let away = "edge-3";
    let code = cluster.agent(away).terminate();
    assert_eq!(code, Some(0), "SIGTERM stops the agent cleanly");
    cluster
        .wait_api(&format!("/agents/{away}"), "the agent offline", |a| {
            a["online"] == false
        })
        .await;

    let id = cluster
        .rollout(json!({
            "bundle": format!("{MODEL}@2.0.0"),
            "selector": "",
            "waves": [{ "size": { "percent": 100 }, "bake_secs": 2 }],
            "install_timeout_secs": 120,
        }))
        .await;
    let view = cluster
        .wait_api(
            &format!("/rollouts/{id}"),
            "the offline agent unreachable",
            |r| r["agents"][away]["phase"]["phase"] == "unreachable",
        )
        .await;
    assert_eq!(view["agents"][away]["online"], false, "{view:#}");
    for agent in ["edge-1", "edge-2"] {
        cluster.wait_reported(agent, "2.0.0").await;
    }
    assert_eq!(
        cluster
            .get(&format!("/agents/{away}"), Some(VIEWER_TOKEN))
            .await
            .1["active"]["version"],
        "1.0.0",
        "the offline agent still counts as v1"
    );

    cluster.agent(away).restart();
    cluster.wait_served(away, MODEL, "2.0.0").await;
    cluster.wait_reported(away, "2.0.0").await;
    let done = cluster
        .wait_rollout_state(&id, &["completed", "rolled_back", "paused", "aborted"])
        .await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let installed = cluster
        .events(away, "active")
        .await
        .iter()
        .any(|e| e["rollout"] == id.as_str());
    assert!(
        installed,
        "the returning agent reported v2 active for the rollout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_process_refuses_calls_without_a_token_or_without_the_role() {
    let cluster = Cluster::embedded();
    let bundle = release(&cluster.keys, "1.0.0", 1, None);
    let spec = serde_json::to_vec(&json!({
        "bundle": format!("{MODEL}@1.0.0"),
        "selector": "",
        "waves": [{ "size": { "percent": 100 }, "bake_secs": 0 }],
    }))
    .expect("json");

    for path in ["/agents", "/fleet", "/bundles", "/rollouts", "/events"] {
        let (status, body) = cluster.get(path, None).await;
        assert_eq!(status, 401, "GET {path} without a token: {body}");
        let (status, body) = cluster.get(path, Some("not-a-token")).await;
        assert_eq!(status, 401, "GET {path} with an unknown token: {body}");
        let (status, body) = cluster.get(path, Some(VIEWER_TOKEN)).await;
        assert_eq!(status, 200, "GET {path} as a viewer: {body}");
    }

    // The refusals are sent the start of the bundle only: the server answers before it reads
    // the body and closes the connection, and a client still sending a large body may see the
    // connection reset instead of the answer.
    let start = bundle[..512].to_vec();
    let (status, body) = cluster.post("/bundles", start.clone(), None).await;
    assert_eq!(status, 401, "upload without a token: {body}");
    let (status, body) = cluster
        .post("/bundles", start.clone(), Some(VIEWER_TOKEN))
        .await;
    assert_eq!(status, 403, "upload as a viewer: {body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("operator"),
        "the refusal names the role needed: {body}"
    );
    let (_, bundles) = cluster.get("/bundles", Some(VIEWER_TOKEN)).await;
    assert!(
        !bundles.to_string().contains("1.0.0"),
        "a refused upload stores nothing: {bundles}"
    );

    let (status, body) = cluster.post("/bundles", bundle, Some(OPERATOR_TOKEN)).await;
    assert_eq!(status, 201, "upload as an operator: {body}");
    let (status, body) = cluster.post("/rollouts", spec.clone(), None).await;
    assert_eq!(status, 401, "rollout without a token: {body}");
    let (status, body) = cluster
        .post("/rollouts", spec.clone(), Some(VIEWER_TOKEN))
        .await;
    assert_eq!(status, 403, "rollout as a viewer: {body}");
    let (_, rollouts) = cluster.get("/rollouts", Some(VIEWER_TOKEN)).await;
    assert!(
        !rollouts.to_string().contains(MODEL),
        "a refused rollout is not created: {rollouts}"
    );

    let (status, body) = cluster
        .call(Method::DELETE, "/agents/edge-1", None, Some(OPERATOR_TOKEN))
        .await;
    assert_eq!(status, 403, "forgetting an agent needs admin: {body}");
    let (status, body) = cluster
        .call(Method::DELETE, "/agents/edge-1", None, Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 404, "an admin gets past the role check: {body}");

    let (status, body) = cluster.get("/openapi.json", None).await;
    assert_eq!(status, 200, "the OpenAPI document needs no token: {body}");
}
