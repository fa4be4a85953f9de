//! The MQTT link and the telemetry outbox against a real rumqttd broker started in-process.

#[path = "support/broker.rs"]
mod broker;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use broker::{start_broker, Broker, Observer};
use flotilla_agent::config::BrokerConfig;
use flotilla_agent::host;
use flotilla_agent::identity::Identity;
use flotilla_agent::link::{Incoming, Link, LinkConfig, LinkError, LinkHandle, PresenceFn, QoS};
use flotilla_agent::outbox::Outbox;
use flotilla_shared::manifest::Backend;
use flotilla_shared::wire::{
    topics, Birth, Envelope, Event, EventKind, Health, Heartbeat, HostMetrics, Presence,
    SignedReport, Telemetry,
};
use flotilla_shared::Sha256Digest;
use rumqttc::Publish;
use std::sync::Arc;
use tokio::sync::mpsc;

const AGENT: &str = "edge-1";
const WAIT: Duration = Duration::from_secs(20);

/// Fails the test when `future` takes longer than [`WAIT`].
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

fn birth(session: u64) -> Vec<u8> {
    let birth = Birth {
        session,
        labels: BTreeMap::new(),
        capabilities: host::capabilities(vec![Backend::Tract]),
        active: None,
        key_set: 1,
        key_set_digest: None,
        identity: identity().public(),
    };
    let envelope = Envelope::new(AGENT, session, 0, Presence::Online(birth));
    identity().seal(&topics::agent_state(AGENT), envelope.encode())
}

fn will(session: u64) -> Vec<u8> {
    let envelope = Envelope::new(AGENT, session, 0, Presence::Offline { session });
    identity().seal(&topics::agent_state(AGENT), envelope.encode())
}

fn identity() -> Identity {
    Identity::new(flotilla_shared::SecretKey::from_seed([1; 32]))
}

fn link_config(broker: &Broker) -> LinkConfig {
    let broker_config = BrokerConfig {
        url: broker.url(),
        ..BrokerConfig::default()
    };
    let birth: PresenceFn = Arc::new(birth);
    let will: PresenceFn = Arc::new(will);
    LinkConfig::new(AGENT, broker_config, birth, will)
}

fn temp_db() -> sled::Db {
    sled::Config::new()
        .temporary(true)
        .open()
        .expect("temporary sled")
}

fn start(config: LinkConfig, db: &sled::Db) -> (LinkHandle, mpsc::Receiver<Incoming>) {
    Link::start(config, db.open_tree("link").expect("link tree")).expect("link starts")
}

fn presence(publish: &Publish) -> Presence {
    SignedReport::decode(&publish.payload)
        .and_then(|r| r.envelope::<Presence>())
        .expect("presence envelope")
        .body
}

fn telemetry(publish: &Publish) -> Envelope<Telemetry> {
    let report = SignedReport::decode(&publish.payload).expect("signed telemetry");
    assert!(report.is_signed_by(&publish.topic, &identity().public()));
    report.envelope().expect("telemetry envelope")
}

async fn wait_connections(link: &LinkHandle, count: u64) {
    let mut stats = link.stats();
    within("connection", stats.wait_for(|s| s.connections >= count))
        .await
        .expect("link alive");
}

async fn wait_listening(link: &LinkHandle, listening: bool) {
    let mut watch = link.control_plane_listening();
    within("control-plane state", watch.wait_for(|l| *l == listening))
        .await
        .expect("link alive");
}

async fn wait_connected(link: &LinkHandle, up: bool) {
    let mut connected = link.connected();
    within("connection state", connected.wait_for(|c| *c == up))
        .await
        .expect("link alive");
}

/// Reads presences until one matches `wanted`, returning what came before it.
async fn presence_until(
    watcher: &mut Observer,
    wanted: impl Fn(&Presence) -> bool,
) -> Vec<Presence> {
    let mut before = Vec::new();
    loop {
        let seen = presence(&watcher.next().await);
        if wanted(&seen) {
            return before;
        }
        before.push(seen);
    }
}

fn is_online(session: u64) -> impl Fn(&Presence) -> bool {
    move |p| matches!(p, Presence::Online(b) if b.session == session)
}

fn heartbeat(n: u64) -> Telemetry {
    Telemetry::Heartbeat(Heartbeat {
        session: 1,
        uptime_s: n,
        active: None,
        health: Health::NoModel,
        host: HostMetrics {
            rss_bytes: 0,
            cpu_percent: 0.0,
        },
        models: Vec::new(),
        dropped_telemetry: 0,
        key_set: 1,
        key_set_digest: None,
    })
}

fn event(n: u32) -> Telemetry {
    Telemetry::Event(Event {
        session: 1,
        rollout: None,
        digest: None,
        kind: EventKind::Downloading {
            received: n,
            total: 100,
        },
    })
}

/// Collects telemetry until every sequence number in `1..=count` was seen, checking that each
/// new number is the one after the previous (repeats of an already seen number are allowed).
async fn consecutive_telemetry(watcher: &mut Observer, count: u64) -> Vec<Envelope<Telemetry>> {
    let mut items: Vec<Envelope<Telemetry>> = Vec::new();
    while (items.len() as u64) < count {
        let envelope = telemetry(&watcher.next().await);
        let expected = items.len() as u64 + 1;
        if envelope.seq < expected {
            continue;
        }
        assert_eq!(
            envelope.seq, expected,
            "telemetry out of order or with a gap"
        );
        items.push(envelope);
    }
    items
}

#[tokio::test]
async fn birth_is_retained_and_a_cut_fires_the_will_of_that_session_before_the_next_birth() {
    let (_port, broker) = start_broker();
    let db = temp_db();
    let (link, _incoming) = start(link_config(&broker), &db);
    wait_connections(&link, 1).await;
    let session = link.session();

    // Subscribing after the birth reached the broker (connecting does not wait for that):
    // only retention can deliver it.
    let state = topics::agent_state(AGENT);
    let mut early = Observer::connect(broker.direct_port(), "early", &[&state]).await;
    presence_until(&mut early, is_online(session)).await;
    let mut watcher = Observer::connect(broker.direct_port(), "watcher", &[&state]).await;
    let retained = watcher.next().await;
    assert!(retained.retain, "birth must be retained");
    assert!(
        is_online(session)(&presence(&retained)),
        "{:?}",
        presence(&retained)
    );

    broker.cut();

    let before_will = presence_until(&mut watcher, |p| *p == Presence::Offline { session }).await;
    assert!(
        before_will.iter().all(|p| p.session() <= session + 1),
        "{before_will:?}"
    );
    // Whatever order the broker put the will and the new birth in, the last word is the birth.
    presence_until(&mut watcher, is_online(session + 1)).await;
    assert_eq!(link.session(), session + 1);
}

#[tokio::test]
async fn a_late_will_makes_the_link_publish_its_birth_again_but_a_forged_one_does_not() {
    let (_port, broker) = start_broker();
    let db = temp_db();
    let state = topics::agent_state(AGENT);
    let mut watcher = Observer::connect(broker.direct_port(), "watcher", &[&state]).await;
    let mut config = link_config(&broker);
    config.own_key = Some(identity().public());
    let (link, _incoming) = start(config, &db);
    wait_connections(&link, 1).await;
    let session = link.session();
    presence_until(&mut watcher, is_online(session)).await;

    // Under another key, a will of this session is not the agent's own: nothing follows it.
    let offline = Envelope::new(AGENT, 0, 0, Presence::Offline { session }).encode();
    let forger = flotilla_shared::SecretKey::from_seed([2; 32]);
    let forged = SignedReport::seal(&state, offline.clone(), &forger);
    let client = watcher.client.clone();
    let publish = |payload: Vec<u8>| client.publish(&state, QoS::AtLeastOnce, true, payload);
    publish(forged).await.unwrap();
    assert_eq!(
        presence(&watcher.next().await),
        Presence::Offline { session }
    );
    assert!(
        watcher.stays_quiet(Duration::from_secs(1)).await,
        "the birth came back for a forgery"
    );

    // Its own late will (as a broker may fire one on takeover) brings the birth back.
    publish(identity().seal(&state, offline)).await.unwrap();
    presence_until(&mut watcher, is_online(session)).await;
}

#[tokio::test]
async fn session_counter_grows_across_agent_restarts_and_a_crash_fires_the_will() {
    let (_port, broker) = start_broker();
    let db = temp_db();
    let state = topics::agent_state(AGENT);
    let mut watcher = Observer::connect(broker.direct_port(), "watcher", &[&state]).await;

    let (link, incoming) = start(link_config(&broker), &db);
    wait_connections(&link, 1).await;
    let first = link.session();
    presence_until(&mut watcher, is_online(first)).await;

    // Dropping every handle ends the link without DISCONNECT, as a crash would.
    drop((link, incoming));
    presence_until(&mut watcher, |p| *p == Presence::Offline { session: first }).await;

    let (restarted, _incoming) = start(link_config(&broker), &db);
    wait_connections(&restarted, 1).await;
    assert_eq!(restarted.session(), first + 1);
    presence_until(&mut watcher, is_online(first + 1)).await;
}

#[tokio::test]
async fn subscriptions_are_restored_after_a_broker_restart() {
    let (_port, broker) = start_broker();
    let db = temp_db();
    let mut config = link_config(&broker);
    config.subscriptions = vec!["test/initial".to_owned()];
    let (link, mut incoming) = start(config, &db);
    link.subscribe("test/added").unwrap();
    link.subscribe("test/removed").unwrap();
    link.unsubscribe("test/removed");
    wait_connections(&link, 1).await;
    let first = link.session();

    broker.restart();
    wait_connections(&link, 2).await;

    // The birth follows the subscriptions on the same connection, so once the fresh broker
    // shows it, the subscriptions are in place.
    let state = topics::agent_state(AGENT);
    let mut watcher = Observer::connect(broker.direct_port(), "watcher", &[&state]).await;
    presence_until(
        &mut watcher,
        |p| matches!(p, Presence::Online(b) if b.session > first),
    )
    .await;

    for (topic, payload) in [
        ("test/removed", "r"),
        ("test/initial", "1"),
        ("test/added", "2"),
    ] {
        watcher
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    let mut received = Vec::new();
    for _ in 0..2 {
        let message = within("resubscribed message", incoming.recv())
            .await
            .expect("link alive");
        received.push((
            message.topic,
            String::from_utf8_lossy(&message.payload).into_owned(),
        ));
    }
    // One publisher's messages arrive in order: "test/removed" would have come first.
    assert_eq!(
        received,
        [
            ("test/initial".to_owned(), "1".to_owned()),
            ("test/added".to_owned(), "2".to_owned())
        ]
    );
}

#[tokio::test]
async fn telemetry_pushed_while_the_broker_is_unreachable_arrives_in_order() {
    let (_port, broker) = start_broker();
    let db = temp_db();
    let telemetry_topic = topics::agent_telemetry(AGENT);
    let mut watcher = Observer::connect(broker.direct_port(), "watcher", &[&telemetry_topic]).await;
    watcher.announce_control_plane(true, 1).await;
    let (link, _incoming) = start(link_config(&broker), &db);
    let outbox = Outbox::open(db.open_tree("outbox").unwrap(), AGENT, identity(), 100).unwrap();
    let delivery = outbox.spawn_delivery(link.clone());
    wait_connections(&link, 1).await;

    broker.partition();
    wait_connected(&link, false).await;
    let mut pushed = Vec::new();
    for n in 0..10u32 {
        let item = if n % 2 == 0 {
            event(n)
        } else {
            heartbeat(u64::from(n))
        };
        pushed.push(item.clone());
        assert_eq!(outbox.push(item).unwrap(), u64::from(n) + 1);
    }
    assert_eq!(outbox.len(), 10);

    broker.heal();
    let received = consecutive_telemetry(&mut watcher, 10).await;
    let bodies: Vec<Telemetry> = received.into_iter().map(|e| e.body).collect();
    assert_eq!(bodies, pushed);

    let mut held = outbox.held();
    within("acknowledgements", held.wait_for(|n| *n == 0))
        .await
        .unwrap();
    delivery.abort();
}

#[tokio::test]
async fn telemetry_waits_while_no_control_plane_listens_and_stale_wills_are_ignored() {
    let (_port, broker) = start_broker();
    let db = temp_db();
    let telemetry_topic = topics::agent_telemetry(AGENT);
    let mut watcher = Observer::connect(broker.direct_port(), "watcher", &[&telemetry_topic]).await;
    let (link, _incoming) = start(link_config(&broker), &db);
    let outbox = Outbox::open(db.open_tree("outbox").unwrap(), AGENT, identity(), 100).unwrap();
    let delivery = outbox.spawn_delivery(link.clone());
    wait_connections(&link, 1).await;

    // Connected, but nobody has said they listen: a broker would acknowledge and discard.
    for n in 0..3u32 {
        outbox.push(event(n)).unwrap();
    }
    assert!(watcher.stays_quiet(Duration::from_millis(500)).await);
    assert!(!*link.control_plane_listening().borrow());
    assert_eq!(outbox.len(), 3);

    watcher.announce_control_plane(true, 10).await;
    wait_listening(&link, true).await;
    let received = consecutive_telemetry(&mut watcher, 3).await;
    assert_eq!(received.last().map(|e| e.seq), Some(3));

    // A late will of an earlier control-plane process changes nothing.
    watcher.announce_control_plane(false, 9).await;
    let mut listening = link.control_plane_listening();
    let went_quiet = tokio::time::timeout(Duration::from_millis(500), listening.wait_for(|l| !*l));
    assert!(went_quiet.await.is_err(), "a stale will stopped telemetry");
    outbox.push(event(3)).unwrap();
    assert_eq!(telemetry(&watcher.next().await).seq, 4);

    // Its own will does: telemetry waits until the next process announces itself.
    watcher.announce_control_plane(false, 10).await;
    wait_listening(&link, false).await;
    outbox.push(event(4)).unwrap();
    assert!(watcher.stays_quiet(Duration::from_millis(500)).await);
    watcher.announce_control_plane(true, 11).await;
    assert_eq!(telemetry(&watcher.next().await).seq, 5);
    delivery.abort();
}

#[tokio::test]
async fn unacknowledged_telemetry_is_sent_again_after_a_broker_restart() {
    let (_port, broker) = start_broker();
    let db = temp_db();
    let control_plane = Observer::connect(broker.direct_port(), "control-plane", &[]).await;
    control_plane.announce_control_plane(true, 1).await;
    let (link, _incoming) = start(link_config(&broker), &db);
    let outbox = Outbox::open(db.open_tree("outbox").unwrap(), AGENT, identity(), 100).unwrap();
    let delivery = outbox.spawn_delivery(link.clone());
    wait_listening(&link, true).await;

    // Frozen: the publishes leave the agent, but no acknowledgement can come back.
    broker.freeze();
    for n in 0..10u32 {
        outbox.push(event(n)).unwrap();
    }
    // Each telemetry publish is well over 40 bytes; pings are 2.
    broker.wait_held_upstream(10 * 40).await;
    assert_eq!(
        outbox.len(),
        10,
        "nothing may be removed without an acknowledgement"
    );

    broker.partition();
    broker.restart();
    broker.thaw();
    // The restarted broker holds no retained state: the control plane announces itself again.
    let telemetry_topic = topics::agent_telemetry(AGENT);
    let mut watcher = Observer::connect(broker.direct_port(), "watcher", &[&telemetry_topic]).await;
    watcher.announce_control_plane(true, 1).await;
    broker.heal();

    let received = consecutive_telemetry(&mut watcher, 10).await;
    assert_eq!(received.last().map(|e| e.seq), Some(10));
    let mut held = outbox.held();
    within("acknowledgements", held.wait_for(|n| *n == 0))
        .await
        .unwrap();
    delivery.abort();
}

#[tokio::test]
async fn a_200_kib_message_fits_both_ways() {
    let (_port, broker) = start_broker();
    let db = temp_db();
    let mut watcher = Observer::connect(broker.direct_port(), "watcher", &["test/big/out"]).await;
    let mut config = link_config(&broker);
    config.subscriptions = vec!["test/big/in".to_owned()];
    let (link, mut incoming) = start(config, &db);
    wait_connections(&link, 1).await;

    let big: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
    link.publish("test/big/out", big.clone(), QoS::AtLeastOnce, false)
        .unwrap();
    let out = watcher.next().await;
    assert_eq!(out.payload.as_ref(), big.as_slice());

    // The link's subscription is in place once its birth is visible (same connection, later).
    let state = topics::agent_state(AGENT);
    let mut state_watcher =
        Observer::connect(broker.direct_port(), "state-watcher", &[&state]).await;
    presence_until(&mut state_watcher, is_online(link.session())).await;
    watcher
        .client
        .publish("test/big/in", QoS::AtLeastOnce, false, big.clone())
        .await
        .unwrap();
    let message = within("200 KiB incoming message", incoming.recv())
        .await
        .expect("link alive");
    assert_eq!(message.payload.as_ref(), big.as_slice());
}

#[tokio::test]
async fn messages_over_the_packet_limit_are_refused_before_queueing() {
    let (_port, broker) = start_broker();
    let db = temp_db();
    let (link, _incoming) = start(link_config(&broker), &db);
    let huge = vec![0u8; 1024 * 1024];
    let err = link
        .publish("test/huge", huge, QoS::AtMostOnce, false)
        .unwrap_err();
    assert!(matches!(err, LinkError::TooLarge { .. }), "{err}");
    assert!(matches!(
        link.publish("test/+", b"x".to_vec(), QoS::AtMostOnce, false),
        Err(LinkError::InvalidTopic(_))
    ));
    assert!(matches!(
        link.subscribe("test/#/bad"),
        Err(LinkError::InvalidFilter(_))
    ));
}

#[tokio::test]
async fn publish_never_blocks_and_reports_a_full_queue() {
    let (_port, broker) = start_broker();
    let db = temp_db();
    let mut watcher = Observer::connect(broker.direct_port(), "watcher", &["test/queued"]).await;
    broker.partition();
    let mut config = link_config(&broker);
    config.queue_capacity = 4;
    let (link, _incoming) = start(config, &db);

    let started = Instant::now();
    for n in 0..4 {
        link.publish("test/queued", vec![n], QoS::AtLeastOnce, false)
            .unwrap();
    }
    let full = link.publish("test/queued", vec![9], QoS::AtLeastOnce, false);
    assert!(matches!(full, Err(LinkError::QueueFull)), "{full:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "publish waited");

    // What was queued goes out, in order, once the broker is reachable.
    broker.heal();
    for n in 0..4 {
        assert_eq!(watcher.next().await.payload.as_ref(), [n]);
    }
}

#[tokio::test]
async fn a_slow_consumer_loses_chunks_but_not_other_messages() {
    let (_port, broker) = start_broker();
    let db = temp_db();
    let chunks = topics::bundle_chunks(&Sha256Digest::of(b"bundle"));
    let desired = topics::agent_desired(AGENT);
    let mut config = link_config(&broker);
    config.subscriptions = vec![chunks.clone(), desired.clone()];
    config.incoming_capacity = 2;
    let (link, mut incoming) = start(config, &db);
    wait_connections(&link, 1).await;
    let state = topics::agent_state(AGENT);
    let mut watcher = Observer::connect(broker.direct_port(), "watcher", &[&state]).await;
    presence_until(&mut watcher, is_online(link.session())).await;

    for n in 0..6u8 {
        watcher
            .client
            .publish(&chunks, QoS::AtLeastOnce, false, vec![n])
            .await
            .unwrap();
    }
    for n in 0..3u8 {
        watcher
            .client
            .publish(&desired, QoS::AtLeastOnce, false, vec![n])
            .await
            .unwrap();
    }

    // Two chunks fill the channel, the other four are dropped, the desired states wait.
    let mut stats = link.stats();
    within(
        "dropped chunks",
        stats.wait_for(|s| s.dropped_incoming == 4),
    )
    .await
    .unwrap();
    let mut received = Vec::new();
    for _ in 0..5 {
        let message = within("incoming message", incoming.recv())
            .await
            .expect("link alive");
        received.push((message.topic == chunks, message.payload[0]));
    }
    assert_eq!(
        received,
        [(true, 0), (true, 1), (false, 0), (false, 1), (false, 2)]
    );
    assert_eq!(link.stats().borrow().dropped_incoming, 4);
}

#[tokio::test]
async fn a_silent_broker_is_noticed_and_the_link_reconnects() {
    let (_port, broker) = start_broker();
    let db = temp_db();
    let mut config = link_config(&broker);
    config.broker.keep_alive_secs = 1;
    let (link, _incoming) = start(config, &db);
    wait_connections(&link, 1).await;

    let frozen_at = Instant::now();
    broker.freeze();
    wait_connected(&link, false).await;
    // Twice the keep-alive, plus room for a loaded machine.
    assert!(
        frozen_at.elapsed() < Duration::from_secs(8),
        "{:?}",
        frozen_at.elapsed()
    );

    broker.thaw();
    wait_connections(&link, 2).await;
}

#[tokio::test]
async fn shutdown_publishes_offline_and_disconnects_cleanly() {
    let (_port, broker) = start_broker();
    let db = temp_db();
    let state = topics::agent_state(AGENT);
    let mut watcher = Observer::connect(broker.direct_port(), "watcher", &[&state]).await;
    let (link, _incoming) = start(link_config(&broker), &db);
    wait_connections(&link, 1).await;
    let session = link.session();
    presence_until(&mut watcher, is_online(session)).await;

    // The offline message is told apart from the will by its envelope sequence number.
    let offline = Envelope::new(AGENT, u64::MAX, 0, Presence::Offline { session }).encode();
    let offline = identity().seal(&state, offline);
    within("shutdown", link.shutdown(offline)).await.unwrap();
    let published = watcher.next().await;
    assert_eq!(
        SignedReport::decode(&published.payload)
            .and_then(|r| r.envelope::<Presence>())
            .unwrap()
            .seq,
        u64::MAX
    );
    assert!(!*link.connected().borrow());
    assert!(matches!(
        link.publish("test/after", vec![1], QoS::AtMostOnce, false),
        Err(LinkError::Closed)
    ));

    // A will would have been published when the connection closed, before this marker.
    watcher
        .client
        .publish(&state, QoS::AtLeastOnce, false, b"marker".to_vec())
        .await
        .unwrap();
    let next = watcher.next().await;
    assert_eq!(
        next.payload.as_ref(),
        b"marker",
        "a will followed a clean shutdown"
    );
}

#[tokio::test]
async fn a_tls_broker_is_reached_with_the_configured_ca_and_client_certificate() {
    let (_port, broker) = start_broker();
    let files = broker::tls_files();
    let db = temp_db();
    let state = topics::agent_state(AGENT);
    let mut watcher = Observer::connect(broker.direct_port(), "watcher", &[&state]).await;

    let mut config = link_config(&broker);
    config.broker.url = format!("mqtts://127.0.0.1:{}", broker.tls_port());
    config.broker.ca_file = Some(files.ca.clone());
    config.broker.client_cert = Some(files.client_cert.clone());
    config.broker.client_key = Some(files.client_key.clone());
    let (link, _incoming) = start(config, &db);

    wait_connections(&link, 1).await;
    presence_until(&mut watcher, is_online(link.session())).await;
}
