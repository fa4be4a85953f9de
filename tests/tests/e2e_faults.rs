//! Faults with real processes: an agent SIGKILLed mid-download or mid-install, chunks
//! corrupted in transit by a relay between an agent and the broker. Agents must resume, detect
//! and recover, and never serve anything but a complete verified model.

use flotilla_tests::procs::{release, wait_for, Cluster, Relay, MODEL};
use serde_json::{json, Value};

/// Waits until agent `id`'s local API serves a model again (after a restart); its version and
/// digest.
async fn first_served(cluster: &Cluster, id: &str) -> (String, String) {
    wait_for(&format!("{id} to serve a model"), || async {
        cluster.served(id, MODEL).await.map(|body| {
            (
                body["versions"][0].as_str().unwrap_or_default().to_owned(),
                body["parameters"]["digest"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
    })
    .await
}

/// A release of [`MODEL`] made from the slow 48-layer encoder with a self-test of many texts,
/// so that seconds pass between `staged` and the switch: a kill on `staged` lands inside the
/// window.
fn slow_to_switch(cluster: &Cluster, version: &str, sequence: u64) -> Vec<u8> {
    let models = flotilla_tests::models_dir();
    flotilla_tests::pack_signed_with(
        models
            .join("tiny-bert-embed-deep")
            .to_str()
            .expect("UTF-8 path"),
        &cluster.keys.publisher,
        |dir| {
            flotilla_control_plane::pack::set_release(dir, Some(MODEL), version, sequence)
                .expect("rewrite bundle.toml");
            let texts: Vec<String> = (0..128)
                .map(|i| format!("\"sentence {i} of a long self-test, 第{i}句\""))
                .collect();
            let spec_path = dir.join("bundle.toml");
            let mut spec = std::fs::read_to_string(&spec_path).expect("bundle.toml");
            spec.push_str(&format!(
                "\n[[self_test]]\nname = \"long\"\ntexts = [{}]\ntolerance = 0.0001\n",
                texts.join(", ")
            ));
            std::fs::write(spec_path, spec).expect("write bundle.toml");
        },
    )
}

fn digest_of(upload: &Value) -> String {
    upload["digest"]
        .as_str()
        .expect("upload answer names the digest")
        .to_owned()
}

/// The broker port of an embedded-broker cluster.
fn embedded_port(cluster: &Cluster) -> u16 {
    cluster
        .server
        .broker_url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("broker URL ends in a port")
}

fn one_wave(version: &str) -> Value {
    json!({
        "bundle": format!("{MODEL}@{version}"),
        "selector": "",
        "waves": [{ "size": { "percent": 100 }, "bake_secs": 1 }],
        "install_timeout_secs": 240,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_download_resumes_without_refetching_verified_chunks() {
    let mut cluster = Cluster::embedded();
    let relay = Relay::start(embedded_port(&cluster));
    let agent = "edge-slow";
    cluster.start_agent_via(agent, &[("site", "lab")], &relay.url());
    let v1 = cluster
        .install_everywhere(release(&cluster.keys, "1.0.0", 1, None), "1.0.0", &[agent])
        .await;
    let v1_digest = digest_of(&v1);

    // Many 4 KiB chunks, and the relay lets about 40 KB a second through to the agent: the
    // download takes several seconds, so it can be caught half done.
    let bundle = release(&cluster.keys, "2.0.0", 2, Some(4096));
    let bundle_len = bundle.len() as f64;
    let v2_digest = digest_of(&cluster.upload(bundle).await);
    relay.set_rate(Some(40_000));
    let mark = cluster.last_event_id().await;
    let id = cluster.rollout(one_wave("2.0.0")).await;

    let halfway = cluster
        .wait_event(agent, "downloading", mark, |e| {
            let (held, total) = progress(e);
            total > 0 && held * 2 >= total && held < total
        })
        .await;
    cluster.agent(agent).kill();
    let (held_before, total) = progress(&halfway);
    let bytes_at_kill = cluster.server_metric("flotilla_chunk_bytes_total").await;
    let mark = cluster.last_event_id().await;

    cluster.agent(agent).restart();
    let (version, digest) = first_served(&cluster, agent).await;
    let complete_old = version == "1.0.0" && digest == v1_digest;
    let complete_new = version == "2.0.0" && digest == v2_digest;
    assert!(
        complete_old || complete_new,
        "after the kill it serves {version} ({digest}), neither complete bundle"
    );
    let resumed = cluster
        .wait_event(agent, "downloading", mark, |e| e["rollout"] == id.as_str())
        .await;
    let (held_after, total_after) = progress(&resumed);
    assert_eq!(total_after, total, "the same bundle: {resumed:#}");
    assert!(
        held_after >= held_before && held_after > 0,
        "the download resumes from the {held_before} chunks held at the kill: {resumed:#}"
    );

    eprintln!(
        "{agent} held {held_before} of {total} chunks at the kill, {held_after} at the restart"
    );
    cluster.wait_served(agent, MODEL, "2.0.0").await;
    cluster.wait_reported(agent, "2.0.0").await;
    let (_, digest) = cluster.served_release(agent).await;
    assert_eq!(digest, v2_digest, "it serves the complete uploaded bundle");
    let done = cluster
        .wait_rollout_state(&id, &["completed", "rolled_back", "paused", "aborted"])
        .await;
    assert_eq!(done["state"], "completed", "{done:#}");

    // After the restart the server sent only what was missing, not the whole bundle again.
    let resent = cluster.server_metric("flotilla_chunk_bytes_total").await - bytes_at_kill;
    let missing = f64::from(total - held_after) / f64::from(total) * bundle_len;
    assert!(
        resent < bundle_len,
        "after the restart {resent} bytes were sent for a {bundle_len}-byte bundle \
         ({held_after} of {total} chunks already held, about {missing} bytes missing)"
    );
    eprintln!("{resent} bytes sent after the restart for a {bundle_len}-byte bundle");
    let failures = cluster.events(agent, "install_failed").await;
    assert!(failures.is_empty(), "no install failed: {failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_once_staged_comes_back_consistent_on_a_complete_model() {
    let mut cluster = Cluster::embedded();
    let agent = "edge-1";
    cluster.start_agent(agent, &[("site", "lab")]);
    let v1_digest = digest_of(
        &cluster
            .install_everywhere(release(&cluster.keys, "1.0.0", 1, None), "1.0.0", &[agent])
            .await,
    );
    let v2_digest = digest_of(&cluster.upload(slow_to_switch(&cluster, "2.0.0", 2)).await);
    let mark = cluster.last_event_id().await;
    let id = cluster.rollout(one_wave("2.0.0")).await;

    // Killed as soon as the server has seen `staged`: v2's long self-test keeps the agent
    // between staging and switching for a while, so the kill lands there. It must come back
    // on one complete model and say so (and if it ever lands after the switch, the same
    // holds for v2).
    cluster.wait_event(agent, "staged", mark, |_| true).await;
    cluster.agent(agent).kill();
    let mark = cluster.last_event_id().await;
    cluster.agent(agent).restart();

    let (first_version, first_digest) = first_served(&cluster, agent).await;
    let started = cluster.wait_event(agent, "started", mark, |_| true).await;
    let reported = started["detail"].to_string();
    let complete = [("1.0.0", &v1_digest), ("2.0.0", &v2_digest)]
        .iter()
        .any(|(v, d)| first_version == *v && first_digest == **d);
    assert!(
        complete,
        "after the restart it serves {first_version} ({first_digest}), not a complete bundle"
    );
    let started_on_v1 = reported.contains(&v1_digest);
    let started_on_v2 = reported.contains(&v2_digest);
    assert!(
        started_on_v1 != started_on_v2,
        "the start report names exactly one of the bundles: {started:#}"
    );
    eprintln!(
        "{agent} restarted on {}, first served {first_version}",
        if started_on_v2 {
            "v2 (killed after the switch)"
        } else {
            "v1 (killed before the switch)"
        }
    );
    if started_on_v2 {
        assert_eq!(
            first_version, "2.0.0",
            "it started on v2, and serves {first_version}"
        );
    }

    cluster.wait_served(agent, MODEL, "2.0.0").await;
    let record = cluster.wait_reported(agent, "2.0.0").await;
    let (version, digest) = cluster.served_release(agent).await;
    assert_eq!(version, "2.0.0");
    assert_eq!(digest, v2_digest, "it serves the uploaded bundle");
    assert_eq!(
        record["active"]["digest"], digest,
        "the server's record matches what the agent serves: {record:#}"
    );
    let done = cluster
        .wait_rollout_state(&id, &["completed", "rolled_back", "paused", "aborted"])
        .await;
    assert_eq!(done["state"], "completed", "{done:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_corrupted_in_transit_are_refused_and_fetched_again() {
    let mut cluster = Cluster::embedded();
    let relay = Relay::start(embedded_port(&cluster));
    let agent = "edge-1";
    cluster.start_agent_via(agent, &[("site", "lab")], &relay.url());
    let v1_digest = digest_of(
        &cluster
            .install_everywhere(release(&cluster.keys, "1.0.0", 1, None), "1.0.0", &[agent])
            .await,
    );
    let v2_digest = digest_of(
        &cluster
            .upload(release(&cluster.keys, "2.0.0", 2, None))
            .await,
    );

    // The relay flips a byte inside the data of the next two payload chunks it forwards; the
    // MQTT framing and the envelope stay valid, so only the chunk hash can tell.
    relay.corrupt_next(2);
    let id = cluster.rollout(one_wave("2.0.0")).await;
    cluster.wait_served(agent, MODEL, "2.0.0").await;
    cluster.wait_reported(agent, "2.0.0").await;

    assert_eq!(relay.corrupted(), 2, "the relay corrupted two chunks");
    let logs = cluster.agents[agent].logs();
    let refusals = logs.matches("chunk does not match its hash").count();
    assert!(
        refusals >= 2,
        "the agent refused each corrupted chunk ({refusals} refusals logged):\n{logs}"
    );
    let (version, digest) = cluster.served_release(agent).await;
    assert_eq!(version, "2.0.0");
    assert_eq!(
        digest, v2_digest,
        "it activated the uploaded bundle, not an altered one"
    );
    assert_ne!(digest, v1_digest);
    let failures = cluster.events(agent, "install_failed").await;
    assert!(
        failures.is_empty(),
        "recovered without failing: {failures:#?}"
    );
    let done = cluster
        .wait_rollout_state(&id, &["completed", "rolled_back", "paused", "aborted"])
        .await;
    assert_eq!(done["state"], "completed", "{done:#}");
}

/// `(received, total)` of a `downloading` event.
fn progress(event: &Value) -> (u32, u32) {
    let find = |key: &str| {
        find_number(&event["detail"], key)
            .unwrap_or_else(|| panic!("no {key} in the downloading event {event:#}"))
    };
    (find("received"), find("total"))
}

fn find_number(value: &Value, key: &str) -> Option<u32> {
    match value {
        Value::Object(map) => map
            .get(key)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .or_else(|| map.values().find_map(|v| find_number(v, key))),
        _ => None,
    }
}
