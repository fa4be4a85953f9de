//! The dashboard's script, run by Node against a live control plane: it renders the fleet,
//! lists agents waiting to be accepted, and escapes what agents report.

use std::process::Command;

use flotilla_control_plane::server::hub::Admission;
use flotilla_shared::wire::{topics, Presence};
use flotilla_tests::fleet::{Fleet, ADMIN_TOKEN, VIEWER_TOKEN};
use flotilla_tests::{agent_report, birth, repo_root};
use rumqttc::{AsyncClient, QoS};
use serde_json::{json, Value};

/// What the dashboard rendered, by element id.
fn render(fleet: &Fleet) -> Value {
    let base = format!("http://{}", fleet.server().api_addr);
    let harness = repo_root().join("tests/dashboard/harness.mjs");
    let out = Command::new("node")
        .arg(&harness)
        .args([&base, VIEWER_TOKEN])
        .output()
        .unwrap_or_else(|e| panic!("node runs the dashboard harness (.ci/run installs it): {e}"));
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("the harness prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_and_agents_waiting_to_be_accepted() {
    let mut fleet = Fleet::start_with(|c| c.admission = Admission::Accept).await;
    fleet.start_agent("edge-1", &[("site", "a")]);
    let pending = fleet
        .wait_api("/pending-agents", |p| p[0]["id"] == "edge-1")
        .await;
    let key = pending[0]["key_id"].clone();
    let body = serde_json::to_vec(&json!({ "key_id": key })).unwrap();
    let (status, accepted) = fleet
        .post("/pending-agents/edge-1/accept", body, Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 200, "{accepted:#}");
    fleet.wait_online(&["edge-1"]).await;

    let shown = render(&fleet);
    assert_eq!(shown["error"]["text"], "", "{shown:#}");
    assert!(
        shown["agents"]["html"].as_str().unwrap().contains("edge-1"),
        "{shown:#}"
    );
    assert_eq!(
        shown["pending-view"]["hidden"], true,
        "nobody waits: {shown:#}"
    );

    // A newcomer whose labels carry markup waits; the dashboard lists it, escaped.
    let (client, mut events) = AsyncClient::new(fleet.mqtt_options("newcomer"), 16);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let state = topics::agent_state("edge-2");
    let labels = [("note", "<img src=x onerror=alert(1)>")];
    let asks: Presence = birth("edge-2", 1, &labels);
    client
        .publish(
            &state,
            QoS::AtLeastOnce,
            false,
            agent_report("edge-2", &state, 0, asks),
        )
        .await
        .unwrap();
    fleet
        .wait_api("/pending-agents", |p| p[0]["id"] == "edge-2")
        .await;

    let shown = render(&fleet);
    assert_eq!(shown["error"]["text"], "", "{shown:#}");
    assert_eq!(shown["pending-view"]["hidden"], false, "{shown:#}");
    let rows = shown["pending"]["html"].as_str().unwrap();
    let key = flotilla_tests::agent_key("edge-2").public().id().0.to_hex();
    assert!(rows.contains("edge-2") && rows.contains(&key), "{rows}");
    assert!(rows.contains("none (new agent)"), "{rows}");
    assert!(rows.contains("&lt;img") && !rows.contains("<img"), "{rows}");
    let cards = shown["cards"]["html"].as_str().unwrap();
    assert!(cards.contains("<b>1</b>waiting for acceptance"), "{cards}");
    fleet.shutdown().await;
}
