//! A real control plane and real agents in one test process: the server from
//! `flotilla_control_plane::server::start` with its embedded broker (or an external one), agents
//! from `flotilla_agent::agent::run`, and an HTTP client speaking the server's API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_agent::config::{AgentConfig, BrokerConfig};
use flotilla_control_plane::server::config::{hash_token, Role, ServerConfig, TokenConfig};
use flotilla_control_plane::server::{self, RunningServer};
use reqwest::Method;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::{free_port, write_public_key, TestKeys};

/// Tokens the test server accepts, one per role.
pub const VIEWER_TOKEN: &str = "viewer-secret";
/// Operator token.
pub const OPERATOR_TOKEN: &str = "operator-secret";
/// Admin token.
pub const ADMIN_TOKEN: &str = "admin-secret";

/// How long a wait for a condition may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(60);

/// A server, its agents and a scratch directory.
pub struct Fleet {
    /// Scratch space: the server's data directory, agents' data directories, keys.
    pub dir: tempfile::TempDir,
    /// Publisher and (unused here) control-plane test keys.
    pub keys: TestKeys,
    /// The running server, until stopped.
    pub server: Option<RunningServer>,
    /// Where agents connect.
    pub broker_url: String,
    agents: BTreeMap<String, RunningAgent>,
    api: ApiClient,
}

/// An agent running in this process.
pub struct RunningAgent {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Its local API.
    pub api: SocketAddr,
}

impl Fleet {
    /// Starts a server with the embedded broker on a free port.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after `edit` adjusted its config.
    pub async fn start_with(edit: impl FnOnce(&mut ServerConfig)) -> Self {
        // rumqttd logs every dropped connection at error level; keep it quiet unless asked.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,rumqttd=off"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("temporary directory");
        let keys = TestKeys::default();
        write_public_key(dir.path(), "publisher", &keys.publisher);
        let mut config = test_config(dir.path().join("server"), dir.path().join("publisher.pub"));
        edit(&mut config);
        let broker_url = match &config.mqtt.external {
            Some(broker) => broker.url.clone(),
            None => format!("mqtt://{}", config.mqtt.listen),
        };
        let server = server::start(config).await.expect("server starts");
        let fleet = Self {
            dir,
            keys,
            server: Some(server),
            broker_url,
            agents: BTreeMap::new(),
            api: ApiClient::default(),
        };
        fleet.wait_ready().await;
        fleet
    }

    /// Waits until the server's MQTT client is connected and subscribed (`/readyz`).
    pub async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.server().api_addr);
        let deadline = Instant::now() + WAIT;
        loop {
            let answer = self
                .api
                .try_call(Method::GET, url.clone(), None, None)
                .await;
            if matches!(answer, Ok((200, _))) {
                return;
            }
            assert!(Instant::now() < deadline, "server never ready: {answer:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The running server.
    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("server running")
    }

    /// Options for a plain MQTT client of the fleet's broker (plain TCP, as the agents), with
    /// packets as large as a chunk.
    pub fn mqtt_options(&self, client_id: &str) -> rumqttc::MqttOptions {
        let (host, port) = self
            .broker_url
            .trim_start_matches("mqtt://")
            .rsplit_once(':')
            .expect("broker URL has a port");
        let port = port.parse().expect("broker port is a number");
        let mut options = rumqttc::MqttOptions::new(client_id, host, port);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_max_packet_size(4 << 20, 4 << 20);
        options
    }

    /// The data directory of agent `id` (whether it runs or not).
    pub fn agent_data_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join("agents").join(id)
    }

    /// The server's data directory.
    pub fn server_dir(&self) -> PathBuf {
        self.dir.path().join("server")
    }

    /// Stops the server (its embedded broker keeps running, as rumqttd cannot stop).
    pub async fn stop_server(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await.expect("server stops cleanly");
        }
    }

    /// Starts a new server on the same data directory, as a client of `broker_url`.
    pub async fn restart_server_on_broker(&mut self) {
        self.restart_server_on_broker_in(self.server_dir()).await;
    }

    /// Starts a new server on `data_dir`, as a client of `broker_url`.
    pub async fn restart_server_on_broker_in(&mut self, data_dir: PathBuf) {
        assert!(self.server.is_none(), "stop the server first");
        let mut config = test_config(data_dir, self.dir.path().join("publisher.pub"));
        config.mqtt.external = Some(BrokerConfig {
            url: self.broker_url.clone(),
            ..BrokerConfig::default()
        });
        config.mqtt.client_id = "flotilla-control-plane-2".into();
        self.server = Some(server::start(config).await.expect("server restarts"));
        self.wait_ready().await;
    }

    /// Starts an agent with `labels`, trusting the test publisher and this server.
    pub fn start_agent(&mut self, id: &str, labels: &[(&str, &str)]) -> SocketAddr {
        self.start_agent_with(id, labels, |_| {})
    }

    /// Like [`Fleet::start_agent`], after `edit` adjusted the agent's config.
    pub fn start_agent_with(
        &mut self,
        id: &str,
        labels: &[(&str, &str)],
        edit: impl FnOnce(&mut AgentConfig),
    ) -> SocketAddr {
        let api = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut config = AgentConfig {
            id: id.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            data_dir: self.agent_data_dir(id),
            ..AgentConfig::default()
        };
        config.broker.url = self.broker_url.clone();
        config.trust.publishers = vec![self.dir.path().join("publisher.pub")];
        config.trust.control_plane = Some(self.server_dir().join("control-plane.pub"));
        config.api.listen = api;
        config.heartbeat_secs = 1;
        edit(&mut config);
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
        self.agents.insert(
            id.to_owned(),
            RunningAgent {
                stop: Some(stop),
                task,
                api,
            },
        );
        api
    }

    /// Stops an agent cleanly (it says goodbye on MQTT).
    pub async fn stop_agent(&mut self, id: &str) {
        let mut agent = self.agents.remove(id).expect("agent running");
        let _ = agent.stop.take().expect("stop sender").send(());
        agent
            .task
            .await
            .expect("agent task joins")
            .expect("agent stops cleanly");
    }

    /// The local API address of a running agent.
    pub fn agent_api(&self, id: &str) -> SocketAddr {
        self.agents[id].api
    }

    /// Stops every agent and the server.
    pub async fn shutdown(mut self) {
        let ids: Vec<String> = self.agents.keys().cloned().collect();
        for id in ids {
            self.stop_agent(&id).await;
        }
        self.stop_server().await;
    }

    /// `GET /api/v1{path}` with `token`; status and JSON body.
    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.api
            .call(Method::GET, self.url(path), None, token)
            .await
    }

    /// `POST /api/v1{path}` with a raw body and `token`.
    pub async fn post(&self, path: &str, body: Vec<u8>, token: Option<&str>) -> (u16, Value) {
        self.api
            .call(Method::POST, self.url(path), Some(body), token)
            .await
    }

    /// `DELETE /api/v1{path}` with `token`.
    pub async fn delete(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.api
            .call(Method::DELETE, self.url(path), None, token)
            .await
    }

    /// Uploads a bundle as the operator; panics unless the server took it.
    pub async fn upload(&self, bundle: Vec<u8>) -> Value {
        self.api.upload(&self.url(""), bundle).await
    }

    /// Starts a rollout as the operator; panics unless it was created.
    pub async fn rollout(&self, spec: Value) -> String {
        self.api.rollout(&self.url(""), spec).await
    }

    /// Steers a rollout as the operator (`pause`, `resume`, `abort`, `rollback`); panics unless
    /// it was accepted, and returns the rollout's view.
    pub async fn steer(&self, id: &str, action: &str) -> Value {
        let path = format!("/rollouts/{id}/{action}");
        let (status, body) = self.post(&path, b"{}".to_vec(), Some(OPERATOR_TOKEN)).await;
        assert_eq!(status, 200, "{action} {id}: {body:#}");
        body
    }

    /// Rolls the uploaded `MODEL@version` out to every agent in one wave without bake and
    /// waits until the rollout completes; returns its id.
    pub async fn roll_out_everywhere(&self, version: &str) -> String {
        let id = self.rollout(one_wave(version, "", 0)).await;
        self.wait_rollout(&id, |r| r["state"] == "completed").await;
        id
    }

    /// Polls the rollout until `done` holds for its view; panics with the last view on
    /// timeout.
    pub async fn wait_rollout(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        self.wait_api(&format!("/rollouts/{id}"), done).await
    }

    /// Polls `GET /api/v1{path}` until `done` holds.
    pub async fn wait_api(&self, path: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, body) = self.get(path, Some(VIEWER_TOKEN)).await;
            if status == 200 && done(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting on {path}; last answer {status}: {body:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every listed agent is online at the server.
    pub async fn wait_online(&self, ids: &[&str]) {
        for id in ids {
            self.wait_api(&format!("/agents/{id}"), |a| a["online"] == true)
                .await;
        }
    }

    /// Waits until the agent's registry record says it serves `version`.
    pub async fn wait_version(&self, id: &str, version: &str) -> Value {
        let want = version.to_owned();
        self.wait_api(&format!("/agents/{id}"), move |a| {
            a["active"]["version"].as_str() == Some(want.as_str())
        })
        .await
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/api/v1{path}", self.server().api_addr)
    }
}

/// A rollout spec for `MODEL@version`: the agents `selector` matches, in one wave of 100 %
/// baking `bake_secs`.
pub fn one_wave(version: &str, selector: &str, bake_secs: u64) -> Value {
    serde_json::json!({
        "bundle": format!("{}@{version}", crate::procs::MODEL),
        "selector": selector,
        "waves": [{ "size": { "percent": 100 }, "bake_secs": bake_secs }],
    })
}

/// Calls to a control plane's REST API, shared by the in-process and the process harnesses.
#[derive(Debug, Clone, Default)]
pub struct ApiClient {
    http: reqwest::Client,
}

impl ApiClient {
    /// `method url` with an optional body and bearer token: status and JSON body (the text
    /// as a JSON string when it is not JSON). Panics when the server cannot be reached.
    pub async fn call(
        &self,
        method: Method,
        url: String,
        body: Option<Vec<u8>>,
        token: Option<&str>,
    ) -> (u16, Value) {
        self.try_call(method, url, body, token)
            .await
            .unwrap_or_else(|e| panic!("server answers: {e}"))
    }

    /// Like [`ApiClient::call`], with a connection failure as an error (for servers that may
    /// be restarting).
    pub async fn try_call(
        &self,
        method: Method,
        url: String,
        body: Option<Vec<u8>>,
        token: Option<&str>,
    ) -> Result<(u16, Value), String> {
        let mut request = self.http.request(method, url);
        if let Some(body) = body {
            request = request.body(body);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// Uploads a bundle to `api` (`http://host:port/api/v1`) as the operator; panics unless
    /// the server took it.
    pub async fn upload(&self, api: &str, bundle: Vec<u8>) -> Value {
        let url = format!("{api}/bundles");
        let (status, body) = self
            .call(Method::POST, url, Some(bundle), Some(OPERATOR_TOKEN))
            .await;
        assert!(status == 201 || status == 200, "upload: {status} {body}");
        body
    }

    /// Starts a rollout from `spec` at `api` as the operator; its id.
    pub async fn rollout(&self, api: &str, spec: Value) -> String {
        let body = serde_json::to_vec(&spec).expect("spec is JSON");
        let url = format!("{api}/rollouts");
        let (status, answer) = self
            .call(Method::POST, url, Some(body), Some(OPERATOR_TOKEN))
            .await;
        assert_eq!(status, 201, "create rollout: {answer}");
        answer["id"].as_str().expect("rollout id").to_owned()
    }
}

/// A server config for tests: free ports, the given data directory, the test publisher,
/// one token per role.
pub fn test_config(data_dir: PathBuf, publisher: PathBuf) -> ServerConfig {
    let mut config = ServerConfig {
        data_dir,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..ServerConfig::default()
    };
    config.mqtt.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    config.trust.publishers = vec![publisher];
    config.tokens = [
        ("viewer", Role::Viewer, VIEWER_TOKEN),
        ("operator", Role::Operator, OPERATOR_TOKEN),
        ("admin", Role::Admin, ADMIN_TOKEN),
    ]
    .into_iter()
    .map(|(name, role, token)| TokenConfig {
        name: name.into(),
        role,
        sha256: hash_token(token),
    })
    .collect();
    config
}

/// Sends `/v1/embed` requests to `apis` until `stop` fires: traffic for the gates to measure.
pub fn traffic(apis: Vec<SocketAddr>) -> oneshot::Sender<()> {
    let (stop, mut stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        loop {
            for api in &apis {
                let _ = client
                    .post(format!("http://{api}/v1/embed"))
                    .json(&serde_json::json!({ "inputs": ["hello fleet", "你好"] }))
                    .send()
                    .await;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = &mut stopped => break,
            }
        }
    });
    stop
}

/// A Mosquitto broker started for one test, on a free port; killed on drop.
pub struct Mosquitto {
    child: std::process::Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts `mosquitto` (from PATH or /usr/sbin) and waits until it accepts connections.
    /// Panics with how to install it when it is missing: CI installs it, so a missing broker
    /// must fail loudly rather than skip.
    pub fn start() -> Self {
        Self::start_with(|_| "allow_anonymous true\n".to_owned())
    }

    /// Starts one configured as `systemd/mosquitto-flotilla.conf` says, with the committed
    /// ACL and a password file holding `users` (name, password).
    pub fn with_flotilla_acl(users: &[(&str, &str)]) -> Self {
        Self::start_with(|dir| {
            let passwords = dir.join("flotilla.passwd");
            for (n, (user, password)) in users.iter().enumerate() {
                let mut command = std::process::Command::new("mosquitto_passwd");
                if n == 0 {
                    command.arg("-c");
                }
                let status = command
                    .arg("-b")
                    .arg(&passwords)
                    .args([user, password])
                    .status()
                    .expect("mosquitto_passwd runs (it comes with mosquitto)");
                assert!(status.success(), "mosquitto_passwd failed for {user}");
            }
            let deploy = crate::repo_root().join("systemd");
            std::fs::read_to_string(deploy.join("mosquitto-flotilla.conf"))
                .expect("systemd/mosquitto-flotilla.conf")
                .replace(
                    "/etc/mosquitto/flotilla.passwd",
                    passwords.to_str().expect("UTF-8 path"),
                )
                .replace(
                    "/etc/mosquitto/mosquitto-flotilla.acl",
                    deploy
                        .join("mosquitto-flotilla.acl")
                        .to_str()
                        .expect("UTF-8 path"),
                )
        })
    }

    /// Starts `mosquitto` on a free port with the settings `settings` writes (given a
    /// directory for its files), without persistence.
    fn start_with(settings: impl FnOnce(&Path) -> String) -> Self {
        let binary = ["mosquitto", "/usr/sbin/mosquitto"]
            .into_iter()
            .find(|b| {
                std::process::Command::new(b)
                    .arg("-h")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok()
            })
            .expect("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it");
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        let config = dir.path().join("mosquitto.conf");
        let settings = settings(dir.path());
        std::fs::write(
            &config,
            format!("listener {port} 127.0.0.1\npersistence false\n{settings}"),
        )
        .expect("write mosquitto.conf");
        let child = std::process::Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
