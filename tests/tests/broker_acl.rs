//! A fleet on Mosquitto configured as `systemd/mosquitto-flotilla.conf` says, with the committed
//! ACL and one user per agent: a rollout works through it, and a device's credentials let it
//! speak only for itself.

use flotilla_agent::config::BrokerConfig;
use flotilla_shared::wire::{topics, Envelope, Presence, SignedReport, TOPIC_ROOT};
use flotilla_tests::fleet::{Fleet, Mosquitto, VIEWER_TOKEN};
use flotilla_tests::{agent_report, birth, pack_signed_with, set_release};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::Value;

const CONTROL_PLANE: (&str, &str) = ("flotilla-control-plane", "control-plane-secret");
const AGENTS: [(&str, &str); 2] = [("edge-1", "edge-1-secret"), ("edge-2", "edge-2-secret")];
/// A device of the fleet whose credentials were stolen.
const STOLEN: (&str, &str) = ("edge-3", "edge-3-secret");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mosquitto_with_the_flotilla_acl_a_device_speaks_only_for_itself() {
    let users: Vec<(&str, &str)> = [CONTROL_PLANE, STOLEN].into_iter().chain(AGENTS).collect();
    let mosquitto = Mosquitto::with_flotilla_acl(&users);
    let mut fleet = Fleet::start_with(|c| {
        c.mqtt.external = Some(BrokerConfig {
            url: mosquitto.url(),
            username: Some(CONTROL_PLANE.0.into()),
            password: Some(CONTROL_PLANE.1.into()),
            ..BrokerConfig::default()
        })
    })
    .await;
    for (id, password) in AGENTS {
        fleet.start_agent_with(id, &[("site", "a")], |c| {
            c.broker.username = Some(id.into());
            c.broker.password = Some(password.into());
        });
    }
    let ids = AGENTS.map(|(id, _)| id);
    fleet.wait_online(&ids).await;

    // Births, telemetry, desired states, chunk requests and chunks all pass the ACL.
    let bundle = pack_signed_with("tiny-bert-embed", &fleet.keys.publisher, |dir| {
        set_release(dir, "1.0.0", 1)
    });
    fleet.upload(bundle).await;
    fleet.roll_out_everywhere("1.0.0").await;
    for id in ids {
        fleet.wait_version(id, "1.0.0").await;
    }

    // With edge-3's credentials: take edge-1's client id, read everything, speak for edge-1.
    let (_, before) = fleet.get("/agents/edge-1", Some(VIEWER_TOKEN)).await;
    let mut options = fleet.mqtt_options("edge-1");
    options.set_credentials(STOLEN.0, STOLEN.1);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = seen_tx.send(Some(p.topic));
                }
                Event::Incoming(Packet::SubAck(_)) => {
                    let _ = seen_tx.send(None);
                }
                _ => {}
            }
        }
    });
    client
        .subscribe(format!("{TOPIC_ROOT}/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(seen.recv().await, Some(None), "subscribed");
    let subscribed_ms = flotilla_control_plane::server::unix_ms();
    // Signed with edge-1's own key, as if that had leaked too: only the broker can stop these.
    let forge = |agent: &str, presence: Presence| {
        agent_report(agent, &topics::agent_state(agent), 1_000_000, presence)
    };
    let edge_1_key = std::fs::read_to_string(fleet.agent_data_dir("edge-1").join("identity.key"))
        .map(|pem| flotilla_shared::SecretKey::from_pem(&pem).unwrap())
        .unwrap();
    let forge_as_edge_1 = |presence: Presence| {
        let topic = topics::agent_state("edge-1");
        let envelope = Envelope::new("edge-1", 1_000_000, 0, presence).encode();
        SignedReport::seal(&topic, envelope, &edge_1_key)
    };
    let mut forged_birth = birth("edge-1", 1_000_000, &[("site", "elsewhere")]);
    if let Presence::Online(birth) = &mut forged_birth {
        birth.identity = edge_1_key.public();
    }
    for (topic, payload) in [
        (topics::agent_state("edge-1"), forge_as_edge_1(forged_birth)),
        (
            topics::agent_state("edge-1"),
            forge_as_edge_1(Presence::Offline { session: 2_000_000 }),
        ),
        (
            topics::agent_desired("edge-1"),
            b"not from the control plane".to_vec(),
        ),
        // Its own presence, which it may write: proof the ones above reached the broker.
        (
            topics::agent_state(STOLEN.0),
            forge(STOLEN.0, birth(STOLEN.0, 1, &[("site", "b")])),
        ),
    ] {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    fleet.wait_online(&[STOLEN.0]).await;

    // Everything it sent before its own birth was dropped by the broker, and its connection
    // took over nothing: edge-1 is online in the same session with the same labels, and never
    // saw a desired state it could not open.
    let (_, edge_1) = fleet.get("/agents/edge-1", Some(VIEWER_TOKEN)).await;
    assert_eq!(edge_1["online"], true, "{edge_1:#}");
    assert_eq!(edge_1["session"], before["session"], "{edge_1:#}");
    assert_eq!(edge_1["labels"]["site"], "a", "{edge_1:#}");
    let (_, rejected) = fleet
        .get("/events?kind=desired_state_rejected", Some(VIEWER_TOKEN))
        .await;
    assert_eq!(rejected["events"], Value::Array(vec![]), "{rejected:#}");
    // The broker, not the signature check, stopped the forgeries.
    let (_, summary) = fleet.get("/fleet", Some(VIEWER_TOKEN)).await;
    assert_eq!(
        summary["dropped_messages"]["unauthenticated"], 0,
        "{summary:#}"
    );

    // Both agents sent heartbeats after the subscription took: none reached edge-3.
    for id in ids {
        fleet
            .wait_api(&format!("/agents/{id}"), |a| {
                a["last_heartbeat_ms"].as_u64() > Some(subscribed_ms + 1000)
            })
            .await;
    }
    let mut topics_seen = Vec::new();
    while let Ok(topic) = seen.try_recv() {
        topics_seen.push(topic.expect("one subscription only"));
    }
    let others: Vec<&String> = topics_seen
        .iter()
        .filter(|t| ids.iter().any(|id| t.contains(&format!("/agents/{id}/"))))
        .collect();
    assert!(
        others.is_empty(),
        "edge-3 read other agents' topics: {others:?}"
    );
    fleet.shutdown().await;
}
