//! Replacing the fleet's publisher keys: key sets made and signed with the CLI, pushed to a
//! real control plane, and followed by real agents over the embedded broker.

use std::path::Path;

use flotilla_shared::{KeySet, SecretKey, SignedKeySet};
use flotilla_tests::fleet::{one_wave, Fleet, ADMIN_TOKEN, OPERATOR_TOKEN, VIEWER_TOKEN};
use flotilla_tests::procs::MODEL;
use flotilla_tests::{pack_signed_with, run_flotilla, set_release, write_public_key};
use serde_json::{json, Value};

fn release(key: &SecretKey, version: &str, sequence: u64) -> Vec<u8> {
    pack_signed_with(MODEL, key, |dir| set_release(dir, version, sequence))
}

/// Key set `version` trusting `keys` (threshold 1), signed by `signers`.
fn key_set(version: u64, keys: &[&SecretKey], signers: &[&SecretKey]) -> Vec<u8> {
    let set = KeySet::new(
        version,
        keys.iter().map(|k| k.public()).collect(),
        1,
        1_800_000_000,
    );
    let mut signed = SignedKeySet::new(&set);
    for key in signers {
        signed.add_signature(key);
    }
    signed.encode()
}

fn write_secret_key(dir: &Path, name: &str, key: &SecretKey) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.key"));
    std::fs::write(&path, key.to_pem().expect("pem")).expect("write secret key");
    path
}

/// Waits until the server trusts key set `version` and every agent reports it, and the
/// server's chain of key sets at that.
async fn wait_caught_up(fleet: &Fleet, version: u64) -> Value {
    let trust = fleet
        .wait_api("/trust", |t| {
            t["version"] == version && t["behind"].as_array().is_some_and(Vec::is_empty)
        })
        .await;
    assert_eq!(trust["forked"], json!([]), "{trust:#}");
    trust
}

/// What `flotilla keyset status` prints for the server at `server`, as a viewer.
fn keyset_status(server: &str) -> String {
    let (ok, out, err) = run_flotilla(&[
        "keyset".as_ref(),
        "status".as_ref(),
        "--server".as_ref(),
        server.as_ref(),
        "--token".as_ref(),
        VIEWER_TOKEN.as_ref(),
    ]);
    assert!(ok, "{out}{err}");
    out
}

/// The server's `/metrics` text.
async fn metrics_text(fleet: &Fleet) -> String {
    reqwest::get(format!("http://{}/metrics", fleet.server().api_addr))
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text")
}

/// Unix milliseconds now.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Rolls `version` out to every agent while edge-2 is away, brings edge-2 back once edge-1
/// serves it, and waits for the rollout to complete on both.
async fn roll_out_as_edge_2_returns(fleet: &mut Fleet, version: &str) {
    let rollout = fleet.rollout(one_wave(version, "", 0)).await;
    fleet.wait_version("edge-1", version).await;
    fleet.start_agent("edge-2", &[("site", "a")]);
    fleet
        .wait_rollout(&rollout, |r| r["state"] == "completed")
        .await;
}

/// Checks that an API answer is the refusal `status` with `words` in its error.
fn assert_refused((status, body): (u16, Value), expected: u16, words: &str) {
    assert_eq!(status, expected, "{body:#}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains(words), "{words:?} not in {error:?}");
}

async fn events(fleet: &Fleet, kind: &str) -> Vec<Value> {
    let (_, page) = fleet
        .get(&format!("/events?kind={kind}"), Some(VIEWER_TOKEN))
        .await;
    page["events"].as_array().cloned().unwrap_or_default()
}

/// The fleet's publisher key (key set 1), as a test holds it.
fn first_publisher() -> SecretKey {
    SecretKey::from_seed([11; 32])
}

/// A server and `agents`, every one serving 1.0.0 signed by [`first_publisher`] and
/// reporting key set 1.
async fn fleet_on_v1(agents: &[&str]) -> (Fleet, Value) {
    let mut fleet = Fleet::start().await;
    assert_eq!(first_publisher().public(), fleet.keys.publisher.public());
    for id in agents {
        fleet.start_agent(id, &[("site", "a")]);
    }
    fleet.wait_online(agents).await;
    fleet.upload(release(&first_publisher(), "1.0.0", 1)).await;
    fleet.roll_out_everywhere("1.0.0").await;
    let trust = wait_caught_up(&fleet, 1).await;
    (fleet, trust)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_key_set_reaches_every_agent_and_retires_the_old_key() {
    let (mut fleet, trust) = fleet_on_v1(&["edge-1", "edge-2"]).await;
    let old = first_publisher();
    let fresh = SecretKey::from_seed([33; 32]);
    assert_eq!(trust["key_sets"], json!([]), "{trust:#}");

    // Key set 2, made, signed and pushed with the CLI: the old key and a fresh one.
    let dir = fleet.dir.path().to_owned();
    let fresh_pub = write_public_key(&dir, "fresh", &fresh);
    let old_key = write_secret_key(&dir, "old", &old);
    let fresh_key = write_secret_key(&dir, "fresh", &fresh);
    let file = dir.join("key-set-2.fks");
    let server = fleet.server().api_url.clone();
    let (ok, out, err) = run_flotilla(&[
        "keyset".as_ref(),
        "new".as_ref(),
        "--version".as_ref(),
        "2".as_ref(),
        "--publisher".as_ref(),
        dir.join("publisher.pub").as_os_str(),
        "--publisher".as_ref(),
        fresh_pub.as_os_str(),
        "--out".as_ref(),
        file.as_os_str(),
    ]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run_flotilla(&[
        "keyset".as_ref(),
        "sign".as_ref(),
        file.as_os_str(),
        "--key".as_ref(),
        old_key.as_os_str(),
        "--key".as_ref(),
        fresh_key.as_os_str(),
    ]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run_flotilla(&["keyset".as_ref(), "show".as_ref(), file.as_os_str()]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("key set 2") && out.contains("threshold 1 of 2"),
        "{out}"
    );
    let push = |token: &str| {
        run_flotilla(&[
            "keyset".as_ref(),
            "push".as_ref(),
            file.as_os_str(),
            "--server".as_ref(),
            server.as_ref(),
            "--token".as_ref(),
            token.as_ref(),
        ])
    };
    let (ok, _, err) = push(OPERATOR_TOKEN);
    assert!(!ok && err.contains("403"), "key sets need an admin: {err}");
    let (ok, out, err) = push(ADMIN_TOKEN);
    assert!(ok, "{out}{err}");
    assert!(out.contains("key set 2 is trusted now"), "{out}");
    wait_caught_up(&fleet, 2).await;
    let out = keyset_status(&server);
    assert!(
        out.contains("trusted: key set 2") && out.contains("every agent reports this key set"),
        "{out}"
    );

    // A release signed by the fresh key alone now goes everywhere.
    fleet.upload(release(&fresh, "2.0.0", 2)).await;
    fleet.roll_out_everywhere("2.0.0").await;

    // Key set 3 retires the old key and adds a third while edge-2 is away; the fresh key is a
    // threshold of key set 2 by itself.
    let third = SecretKey::from_seed([66; 32]);
    fleet.stop_agent("edge-2").await;
    let (status, body) = fleet
        .post(
            "/trust",
            key_set(3, &[&fresh, &third], &[&fresh, &third]),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 201, "{body:#}");

    // A release only key set 3 trusts reaches edge-2 when it returns: the chain comes inside
    // its desired state, so it trusts the third key before it looks at the bundle.
    fleet.upload(release(&third, "3.0.0", 3)).await;
    roll_out_as_edge_2_returns(&mut fleet, "3.0.0").await;
    let trust = wait_caught_up(&fleet, 3).await;
    assert_eq!(trust["publishers"].as_array().map(Vec::len), Some(2));
    let applied = events(&fleet, "key_set_applied").await;
    assert_eq!(applied.len(), 4, "two key sets, two agents: {applied:#?}");
    assert!(
        applied
            .iter()
            .all(|e| e["detail"]["kind"]["key_set_applied"]["active_trusted"] == true),
        "{applied:#?}"
    );

    let metrics = metrics_text(&fleet).await;
    assert!(
        metrics.contains("flotilla_trusted_key_set 3")
            && metrics.contains("flotilla_agents_by_key_set{key_set=\"3\"} 2"),
        "{metrics}"
    );

    // The old key is refused everywhere: uploads, and rollouts of what it signed.
    assert_refused(
        fleet
            .post("/bundles", release(&old, "4.0.0", 4), Some(OPERATOR_TOKEN))
            .await,
        400,
        "unknown keys",
    );
    let spec = one_wave("1.0.0", "", 0);
    assert_refused(
        fleet
            .post(
                "/rollouts",
                spec.to_string().into_bytes(),
                Some(OPERATOR_TOKEN),
            )
            .await,
        400,
        "not signed by the publisher keys trusted now (key set 3)",
    );

    // A restarted agent trusts key set 3 from its data directory, before any desired state:
    // its first heartbeat of the new session says so, and it applies no key set again.
    let (_, before) = fleet.get("/agents/edge-1", Some(VIEWER_TOKEN)).await;
    fleet.stop_agent("edge-1").await;
    let restarted = unix_ms();
    fleet.start_agent("edge-1", &[("site", "a")]);
    let session = before["session"].as_u64().unwrap();
    let after = fleet
        .wait_api("/agents/edge-1", |a| {
            a["session"].as_u64() > Some(session)
                && a["last_heartbeat_ms"].as_u64() > Some(restarted)
        })
        .await;
    assert_eq!(after["key_set"], 3, "{after:#}");
    assert_eq!(after["active"]["version"], "3.0.0", "{after:#}");
    assert_eq!(events(&fleet, "key_set_applied").await.len(), 4);

    // A device that trusts another key set 3 (a chain signed by someone holding publisher
    // keys) reports the same version, but not the same set: it stands out.
    let forked = FakeDevice::connect(&fleet, "edge-fork").await;
    let theirs = flotilla_shared::Sha256Digest::of(b"another chain's key set 3");
    forked.publish_birth(3, Some(theirs)).await;
    let trust = fleet
        .wait_api("/trust", |t| {
            t["forked"].as_array().is_some_and(|f| !f.is_empty())
        })
        .await;
    assert_eq!(trust["forked"][0]["agent"], "edge-fork", "{trust:#}");
    assert_eq!(trust["forked"][0]["reported"], theirs.to_hex(), "{trust:#}");
    assert_eq!(
        trust["forked"].as_array().map(Vec::len),
        Some(1),
        "{trust:#}"
    );
    let out = keyset_status(&server);
    assert!(
        out.contains("1 agent(s) trust a key set this server did not issue")
            && out.contains("edge-fork"),
        "{out}"
    );
    let metrics = metrics_text(&fleet).await;
    assert!(
        metrics.contains("flotilla_agents_key_set_forked 1"),
        "{metrics}"
    );
    assert_eq!(events(&fleet, "key_set_forked").await.len(), 1);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_set_that_would_strand_agents_is_refused_unless_forced() {
    let (fleet, _) = fleet_on_v1(&["edge-1"]).await;
    let old = first_publisher();
    let fresh = SecretKey::from_seed([33; 32]);

    let refused = [
        (
            key_set(2, &[&fresh], &[&old, &fresh]),
            OPERATOR_TOKEN,
            403,
            "admin",
        ),
        (
            b"not a key set".to_vec(),
            ADMIN_TOKEN,
            400,
            "malformed key set",
        ),
        (
            key_set(3, &[&fresh], &[&old, &fresh]),
            ADMIN_TOKEN,
            409,
            "key set 2 is missing",
        ),
        (
            key_set(2, &[&fresh], &[&fresh]),
            ADMIN_TOKEN,
            400,
            "by keys of key set 1",
        ),
        (
            key_set(2, &[&fresh], &[&old]),
            ADMIN_TOKEN,
            400,
            "by keys of key set 2",
        ),
        (
            key_set(2, &[&fresh], &[&old, &fresh]),
            ADMIN_TOKEN,
            409,
            "edge-1 (tiny-bert-embed@1.0.0)",
        ),
    ];
    for (body, token, expected, words) in refused {
        assert_refused(
            fleet.post("/trust", body, Some(token)).await,
            expected,
            words,
        );
    }
    let trust = wait_caught_up(&fleet, 1).await;
    assert_eq!(trust["key_sets"], json!([]), "nothing refused was kept");

    // An upload checked against key set 1 just before key set 2 lands is not stored after it.
    let hub = fleet.server().hub();
    let late = release(&old, "1.5.0", 5);
    let checked = {
        let verifier = hub.lock().unwrap().upload_verifier(unix_ms()).unwrap();
        verifier.verify(&late).unwrap()
    };
    let rotation = key_set(2, &[&fresh], &[&old, &fresh]);
    let rotation_digest = flotilla_shared::SignedKeySet::decode(&rotation)
        .unwrap()
        .digest()
        .to_hex();
    let (status, body) = fleet
        .post("/trust?force=true", rotation.clone(), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 201, "{body:#}");
    let refused = hub
        .lock()
        .unwrap()
        .add_bundle(checked, &late, unix_ms())
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("changed while the bundle was checked"),
        "{refused}"
    );
    wait_caught_up(&fleet, 2).await;
    assert_refused(
        fleet.post("/trust", rotation, Some(ADMIN_TOKEN)).await,
        409,
        "not newer",
    );

    let added = events(&fleet, "key_set_added").await;
    assert!(
        added[0]["message"]
            .as_str()
            .unwrap()
            .contains("forced past 1 agent(s)"),
        "{added:#?}"
    );
    let applied = events(&fleet, "key_set_applied").await;
    assert!(
        applied[0]["message"]
            .as_str()
            .unwrap()
            .contains("the bundle it serves is not signed by them"),
        "{applied:#?}"
    );
    // The agent keeps serving what it had.
    let agent = fleet.wait_version("edge-1", "1.0.0").await;
    assert_eq!(agent["key_set"], 2);
    assert_eq!(
        agent["key_set_digest"],
        rotation_digest.as_str(),
        "{agent:#}"
    );

    // Every desired state carries the chain, so it cannot grow past what a state can carry:
    // sets of 1700 keys each (about 58 KiB) fit four times, not five.
    let crowd = |version: u64| {
        let mut keys: Vec<flotilla_shared::PublicKey> = (0..1700u32)
            .map(|n| {
                let mut seed = [0u8; 32];
                seed[..8].copy_from_slice(&(u64::from(n) + version * 10_000).to_be_bytes());
                SecretKey::from_seed(seed).public()
            })
            .collect();
        keys.push(fresh.public());
        let mut signed = SignedKeySet::new(&KeySet::new(version, keys, 1, 1_800_000_000));
        signed.add_signature(&fresh);
        signed.encode()
    };
    for version in 3..=6 {
        let (status, body) = fleet
            .post("/trust?force=true", crowd(version), Some(ADMIN_TOKEN))
            .await;
        assert_eq!(status, 201, "{body:#}");
    }
    assert_refused(
        fleet
            .post("/trust?force=true", crowd(7), Some(ADMIN_TOKEN))
            .await,
        409,
        "that every desired state can carry",
    );
    wait_caught_up(&fleet, 6).await;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_set_moves_the_fleet_to_a_new_control_plane_key() {
    let (mut fleet, _) = fleet_on_v1(&["edge-1", "edge-2"]).await;
    let publisher = first_publisher();
    let server_dir = fleet.server_dir();
    let first_key = SecretKey::from_pem(
        &std::fs::read_to_string(server_dir.join("control-plane.key")).expect("first key"),
    )
    .expect("first key parses");

    // A set naming a key the server cannot sign with is refused, and says what to do.
    let mut unknown = KeySet::new(2, vec![publisher.public()], 1, 1_800_000_000);
    unknown.control_plane = Some(SecretKey::from_seed([44; 32]).public());
    let mut signed = SignedKeySet::new(&unknown);
    signed.add_signature(&publisher);
    assert_refused(
        fleet
            .post("/trust", signed.encode(), Some(ADMIN_TOKEN))
            .await,
        409,
        "flotilla server new-key",
    );

    // Whoever stole the first key pushes edge-1's generation up, so that no honest state
    // would count as new.
    let (_, edge_1) = fleet.get("/agents/edge-1", Some(VIEWER_TOKEN)).await;
    let serving = serde_json::from_value(edge_1["desired"]["bundle"].clone()).unwrap();
    send_as_control_plane(&fleet, "edge-1", u64::MAX - 1, Some(serving), &first_key).await;
    fleet
        .wait_api("/events?kind=active&agent=edge-1", |p| {
            p["events"].as_array().is_some_and(|e| e.len() >= 2)
        })
        .await;

    // The operator makes the key in the server's data directory and names it in key set 2,
    // while edge-2 is away.
    fleet.stop_agent("edge-2").await;
    let (ok, out, err) = run_flotilla(&[
        "server".as_ref(),
        "new-key".as_ref(),
        "--data-dir".as_ref(),
        server_dir.as_os_str(),
    ]);
    assert!(ok, "{out}{err}");
    let new_pub = out
        .lines()
        .find_map(|l| l.strip_prefix("public key  "))
        .expect("the public key file is named")
        .to_owned();
    let file = fleet.dir.path().join("key-set-2.fks");
    let (ok, out, err) = run_flotilla(&[
        "keyset".as_ref(),
        "new".as_ref(),
        "--version".as_ref(),
        "2".as_ref(),
        "--publisher".as_ref(),
        fleet.dir.path().join("publisher.pub").as_os_str(),
        "--control-plane".as_ref(),
        new_pub.as_ref(),
        "--out".as_ref(),
        file.as_os_str(),
    ]);
    assert!(ok, "{out}{err}");
    let mut key_set_2 = SignedKeySet::decode(&std::fs::read(&file).unwrap()).unwrap();
    key_set_2.add_signature(&publisher);
    let (status, body) = fleet
        .post("/trust", key_set_2.encode(), Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 201, "{body:#}");
    let trust = fleet
        .wait_api("/trust", |t| {
            t["behind"].as_array().is_some_and(|b| b.len() == 1) && t["version"] == 2
        })
        .await;
    assert_eq!(trust["behind"][0]["agent"], "edge-2", "{trust:#}");
    let new_pem = std::fs::read_to_string(&new_pub).unwrap();
    let (_, served) = fleet.get("/server/key", Some(VIEWER_TOKEN)).await;
    assert_eq!(
        served.as_str(),
        Some(new_pem.as_str()),
        "the newest key is handed out"
    );

    // edge-2 returns still trusting the first key: its state is signed by the first key too,
    // so it can check it and learn key set 2 from it. The rollout completes on both.
    fleet.upload(release(&publisher, "2.0.0", 2)).await;
    roll_out_as_edge_2_returns(&mut fleet, "2.0.0").await;
    wait_caught_up(&fleet, 2).await;

    // Every state is signed by the new key and by the first, whatever key set its agent
    // reports: one on key set 1 can check it, and then follow the chain inside.
    let first_id = first_key.public().id();
    let new_id = flotilla_shared::PublicKey::from_pem(&new_pem).unwrap().id();
    let mut device = FakeDevice::connect(&fleet, "edge-old").await;
    device.publish_birth(1, None).await;
    assert_eq!(device.next_signers().await, (new_id, vec![first_id]));
    device.leave(&fleet).await;

    // A restarted server and agent keep to the new key.
    fleet.stop_server().await;
    fleet.restart_server_on_broker().await;
    fleet.stop_agent("edge-1").await;
    fleet.start_agent("edge-1", &[("site", "a")]);
    fleet.wait_online(&["edge-1"]).await;
    fleet.upload(release(&publisher, "3.0.0", 3)).await;
    fleet.roll_out_everywhere("3.0.0").await;
    let before = events(&fleet, "desired_state_rejected").await.len();

    // The first key no longer moves an agent.
    send_as_control_plane(&fleet, "edge-2", 1_000, None, &first_key).await;
    let rejected = fleet
        .wait_api("/events?kind=desired_state_rejected", |page| {
            page["events"].as_array().is_some_and(|e| e.len() > before)
        })
        .await;
    let last = &rejected["events"][before];
    assert_eq!(last["agent"], "edge-2", "{rejected:#}");
    assert!(
        last["message"].as_str().unwrap().contains("unknown key"),
        "{rejected:#}"
    );
    fleet.shutdown().await;
}

/// Publishes a desired state for `agent` naming `bundle`, numbered `generation` and signed by
/// `key`, as whoever holds that control-plane key could.
async fn send_as_control_plane(
    fleet: &Fleet,
    agent: &str,
    generation: u64,
    bundle: Option<flotilla_shared::wire::DesiredBundle>,
    key: &SecretKey,
) {
    use flotilla_shared::wire::{topics, DesiredState, Envelope, SignedDesiredState};
    let state = DesiredState {
        agent: agent.into(),
        generation,
        bundle,
        rollout: None,
        issued_at_ms: 0,
        key_sets: vec![],
    };
    let id = format!("intruder-{agent}-{generation}");
    let (client, mut eventloop) = rumqttc::AsyncClient::new(fleet.mqtt_options(&id), 16);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let message = Envelope::new("control-plane", 1, 0, SignedDesiredState::sign(&state, key));
    client
        .publish(
            topics::agent_desired(agent),
            rumqttc::QoS::AtLeastOnce,
            false,
            message.encode(),
        )
        .await
        .unwrap();
}

/// An MQTT client playing an agent that reports whatever key set the test says in its birth,
/// and watches who signs the desired states sent to it.
struct FakeDevice {
    id: &'static str,
    client: rumqttc::AsyncClient,
    desired: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
}

impl FakeDevice {
    async fn connect(fleet: &Fleet, id: &'static str) -> Self {
        use flotilla_shared::wire::topics;
        let (client, mut eventloop) = rumqttc::AsyncClient::new(fleet.mqtt_options(id), 16);
        let (tx, desired) = tokio::sync::mpsc::unbounded_channel();
        let topic = topics::agent_desired(id);
        let watched = topic.clone();
        tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = event {
                    if p.topic == watched {
                        let _ = tx.send(p.payload.to_vec());
                    }
                }
            }
        });
        client
            .subscribe(topic, rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        Self {
            id,
            client,
            desired,
        }
    }

    async fn send(&self, topic: String, payload: Vec<u8>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// Comes online with no model, trusting `key_set` (of `digest`, when it says): a newcomer
    /// the server gives a release.
    async fn publish_birth(&self, key_set: u64, digest: Option<flotilla_shared::Sha256Digest>) {
        use flotilla_shared::wire::{topics, Birth, Presence};
        let birth = Birth {
            session: 1,
            labels: [("site".to_owned(), "a".to_owned())].into(),
            capabilities: flotilla_agent::host::capabilities(vec![
                flotilla_shared::manifest::Backend::Tract,
            ]),
            active: None,
            key_set,
            key_set_digest: digest,
            identity: flotilla_tests::agent_key(self.id).public(),
        };
        let topic = topics::agent_state(self.id);
        let message = flotilla_tests::agent_report(self.id, &topic, 0, Presence::Online(birth));
        self.send(topic, message).await;
    }

    /// Goes offline and is forgotten, so later rollouts do not wait for it.
    async fn leave(&self, fleet: &Fleet) {
        use flotilla_shared::wire::{topics, Presence};
        let topic = topics::agent_state(self.id);
        let offline = Presence::Offline { session: 1 };
        let message = flotilla_tests::agent_report(self.id, &topic, 0, offline);
        self.send(topic, message).await;
        fleet
            .wait_api(&format!("/agents/{}", self.id), |a| a["online"] == false)
            .await;
        let path = format!("/agents/{}", self.id);
        let (status, body) = fleet.delete(&path, Some(ADMIN_TOKEN)).await;
        assert_eq!(status, 204, "{body:#}");
    }

    /// The keys that signed the next desired state sent to it: the main one, and the others.
    async fn next_signers(&mut self) -> (flotilla_shared::KeyId, Vec<flotilla_shared::KeyId>) {
        use flotilla_shared::wire::{Envelope, SignedDesiredState};
        let payload = tokio::time::timeout(std::time::Duration::from_secs(30), self.desired.recv())
            .await
            .expect("a desired state arrives")
            .expect("watcher running");
        let signed = Envelope::<SignedDesiredState>::decode(&payload)
            .expect("a desired state")
            .body;
        (
            signed.key_id,
            signed.also.iter().map(|s| s.key_id).collect(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_signed_ahead_by_the_new_keys_counts_as_theirs_at_the_rotation() {
    let (fleet, _) = fleet_on_v1(&["edge-1"]).await;
    let (old, fresh) = (first_publisher(), SecretKey::from_seed([33; 32]));
    // Signed by both keys while only the old one is trusted: the upload counts the old one.
    let both = {
        let bytes = release(&old, "2.0.0", 2);
        let mut bundle = flotilla_shared::Bundle::parse(&bytes).unwrap();
        bundle.add_signature(&fresh);
        bundle.to_bytes()
    };
    let record = fleet.upload(both).await;
    assert_eq!(record["signed_by"], json!([old.public().id().0.to_hex()]));
    let rollout = fleet.rollout(one_wave("2.0.0", "", 3600)).await;
    fleet.wait_version("edge-1", "2.0.0").await;

    // Straight to the fresh key alone. While the rollout runs it could send edge-1 back to
    // 1.0.0, which the fresh key did not sign: refused until it is over.
    let rotation = key_set(2, &[&fresh], &[&old, &fresh]);
    assert_refused(
        fleet
            .post("/trust", rotation.clone(), Some(ADMIN_TOKEN))
            .await,
        409,
        &format!("active rollout(s) {rollout} ship, or would roll back to"),
    );
    fleet.steer(&rollout, "abort").await;

    // Now edge-1 serves a bundle the fresh key signed, so nothing strands.
    let (status, body) = fleet.post("/trust", rotation, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 201, "{body:#}");
    let (_, record) = fleet
        .get(&format!("/bundles/{MODEL}@2.0.0"), Some(VIEWER_TOKEN))
        .await;
    let signers = record["signed_by"].as_array().unwrap();
    assert!(
        signers.contains(&json!(fresh.public().id().0.to_hex())),
        "{record:#}"
    );
    let applied = fleet
        .wait_api("/events?kind=key_set_applied", |p| {
            p["events"].as_array().is_some_and(|e| !e.is_empty())
        })
        .await;
    assert_eq!(
        applied["events"][0]["detail"]["kind"]["key_set_applied"]["active_trusted"], true,
        "{applied:#}"
    );
    fleet.shutdown().await;
}
