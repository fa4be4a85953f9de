//! Real processes for end-to-end tests: `flotilla server` and `flotilla-agent run` as children
//! with their own data directories, a restartable Mosquitto, and a TCP relay that can slow down
//! or corrupt what a broker sends to one client. Every child is stopped when its handle drops
//! (SIGTERM, then SIGKILL when it does not exit in time).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_control_plane::server::config::hash_token;
use flotilla_shared::wire::{Chunk, ChunkPart, Envelope};
use serde_json::Value;

use crate::fleet::{ApiClient, ADMIN_TOKEN, OPERATOR_TOKEN, VIEWER_TOKEN};
use crate::{binary, free_port, write_public_key, TestKeys};

/// How long a wait for a condition may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(90);

/// The model every end-to-end test rolls out.
pub const MODEL: &str = "tiny-bert-embed";

/// [`MODEL`] packed as `version` with `sequence` and signed by the test publisher, with
/// `chunk_size`-byte transfer chunks when given (default 128 KiB).
pub fn release(keys: &TestKeys, version: &str, sequence: u64, chunk_size: Option<u32>) -> Vec<u8> {
    crate::pack_signed_with(MODEL, &keys.publisher, |dir| {
        crate::set_release(dir, version, sequence);
        if let Some(size) = chunk_size {
            crate::set_chunk_size(dir, size);
        }
    })
}

/// How long a child gets to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(10);

/// A child process that is stopped when dropped, with its output in a log file.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Spawns `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open a process log");
        let err = out.try_clone().expect("clone a log handle");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has not exited yet.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL, then reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit (SIGKILL after a grace period); the exit code, if it
    /// exited on its own.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        signal(&child, "TERM");
        let deadline = Instant::now() + GRACE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM without waiting (see [`Proc::terminate`] to wait).
    fn send_term(&self) {
        if let Some(child) = &self.child {
            signal(child, "TERM");
        }
    }

    /// The last `lines` lines of its log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        format!(
            "--- {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            all[start..].join("\n")
        )
    }

    /// The whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.terminate();
        }
    }
}

/// [`binary`], built once per test process.
fn built(name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    built
        .entry(name.to_owned())
        .or_insert_with(|| binary(name))
        .clone()
}

fn signal(child: &Child, name: &str) {
    let _ = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status();
}

/// A child process that is killed if the test ends before it exits.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Polls `probe` until it yields a value or [`WAIT`] passes; panics with `what` and the last
/// state `probe` described.
pub async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match probe().await {
            Ok(value) => return value,
            Err(last) => last,
        };
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last state: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Mosquitto broker that can be killed and started again on the same port.
pub struct Broker {
    proc: Option<Proc>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Broker {
    /// Starts Mosquitto (from PATH or /usr/sbin) on a free port without persistence, so a
    /// restart forgets sessions and retained messages as a crashed broker would.
    pub fn start() -> Self {
        let mut broker = Self {
            proc: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("temporary directory"),
        };
        broker.restart();
        broker
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGKILLs the broker.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Starts the broker again on the same port (killing it first if it runs) and waits until
    /// it accepts connections.
    pub fn restart(&mut self) {
        self.kill();
        let exe = ["mosquitto", "/usr/sbin/mosquitto"]
            .into_iter()
            .find(|b| {
                Command::new(b)
                    .arg("-h")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok()
            })
            .expect("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it");
        let config = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\n",
                self.port
            ),
        )
        .expect("write mosquitto.conf");
        let mut command = Command::new(exe);
        command.arg("-c").arg(&config);
        self.proc = Some(Proc::spawn(
            "mosquitto",
            command,
            &self.dir.path().join("mosquitto.log"),
        ));
        wait_listening(self.port, "mosquitto");
    }
}

/// Which broker the server uses.
#[derive(Debug, Clone)]
pub enum ServerBroker {
    /// Its embedded rumqttd on this port.
    Embedded(u16),
    /// An external broker at this URL.
    External(String),
}

/// `flotilla server` as a child process, with a config file written for it.
pub struct ServerProc {
    proc: Option<Proc>,
    config: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// REST API address.
    pub api: SocketAddr,
    /// The broker agents should connect to.
    pub broker_url: String,
    starts: u32,
}

impl ServerProc {
    /// Writes a config (free API port, `broker`, trust in `publisher`, one token per role) into
    /// `dir` and starts the server on it.
    pub fn start(dir: &Path, publisher: &Path, broker: ServerBroker) -> Self {
        let api = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let data_dir = dir.join("server");
        let (mqtt, broker_url) = match &broker {
            ServerBroker::Embedded(port) => (
                format!("[mqtt]\nlisten = \"127.0.0.1:{port}\"\n"),
                format!("mqtt://127.0.0.1:{port}"),
            ),
            ServerBroker::External(url) => {
                (format!("[mqtt.external]\nurl = \"{url}\"\n"), url.clone())
            }
        };
        let mut text = format!(
            "data_dir = {:?}\nlisten = \"{api}\"\nagent_timeout_secs = 10\n\n{mqtt}\n\
             [trust]\npublishers = [{:?}]\n",
            data_dir.display().to_string(),
            publisher.display().to_string(),
        );
        for (name, role, token) in [
            ("viewer", "viewer", VIEWER_TOKEN),
            ("operator", "operator", OPERATOR_TOKEN),
            ("admin", "admin", ADMIN_TOKEN),
        ] {
            text.push_str(&format!(
                "\n[[tokens]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
                hash_token(token)
            ));
        }
        let config = dir.join("server.toml");
        std::fs::write(&config, text).expect("write server.toml");
        let mut server = Self {
            proc: None,
            config,
            data_dir,
            api,
            broker_url,
            starts: 0,
        };
        server.restart();
        server
    }

    /// Starts the server (again) on the same config and data directory, after killing it if it
    /// runs; returns once its key file exists and `/readyz` answers 200.
    pub fn restart(&mut self) {
        self.kill();
        self.starts += 1;
        let mut command = Command::new(built("flotilla"));
        command
            .args(["server", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info,rumqttd=warn");
        let log = self
            .config
            .with_file_name(format!("server-{}.log", self.starts));
        self.proc = Some(Proc::spawn("flotilla server", command, &log));

        let deadline = Instant::now() + Duration::from_secs(60);
        let ready = format!("http://{}/readyz", self.api);
        loop {
            let key_written = self.public_key().exists();
            let is_ready =
                key_written && probe::get_status(&ready).is_some_and(|status| status == 200);
            if is_ready {
                return;
            }
            let running = self.proc.as_mut().is_some_and(Proc::running);
            assert!(
                running && Instant::now() < deadline,
                "server did not become ready (running: {running})\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// SIGTERM, waiting for the exit; its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.proc.take().and_then(|mut proc| proc.terminate())
    }

    /// The control plane's public key file, which agents trust.
    pub fn public_key(&self) -> PathBuf {
        self.data_dir.join("control-plane.pub")
    }

    /// The end of the current log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.proc
            .as_ref()
            .map_or_else(String::new, |proc| proc.log_tail(lines))
    }
}

/// A blocking status probe without a runtime: a bare HTTP/1.0 GET.
mod probe {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    /// The status code of `GET url` (`http://host:port/path`), or `None` when it fails.
    pub fn get_status(url: &str) -> Option<u16> {
        let rest = url.strip_prefix("http://")?;
        let (host, path) = rest.split_once('/')?;
        let mut stream = TcpStream::connect(host).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).ok()?;
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    }
}

/// How an agent process is started.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// Agent id.
    pub id: String,
    /// Labels, `KEY=VALUE`.
    pub labels: Vec<(String, String)>,
    /// Data directory, kept across restarts.
    pub data_dir: PathBuf,
    /// Broker URL it connects to.
    pub broker: String,
    /// Its local API.
    pub api: SocketAddr,
    /// Trusted publisher key.
    pub publisher: PathBuf,
    /// The control plane's key.
    pub control_plane: PathBuf,
}

/// `flotilla-agent run` as a child process.
pub struct AgentProc {
    /// How it is started; change `broker` before a restart to move it.
    pub spec: AgentSpec,
    proc: Option<Proc>,
    starts: u32,
}

impl AgentProc {
    /// Starts an agent (heartbeat every second) and waits until its local API answers.
    pub fn start(spec: AgentSpec) -> Self {
        std::fs::create_dir_all(&spec.data_dir).expect("agent data directory");
        let mut agent = Self {
            spec,
            proc: None,
            starts: 0,
        };
        agent.restart();
        agent
    }

    /// Starts it again on the same data directory (SIGKILLing it first if it runs) and waits
    /// until its local API answers.
    pub fn restart(&mut self) {
        self.kill();
        self.starts += 1;
        let spec = &self.spec;
        let mut command = Command::new(built("flotilla-agent"));
        command
            .args(["run", "--id", &spec.id, "--broker", &spec.broker])
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .args(["--listen", &spec.api.to_string(), "--heartbeat-secs", "1"])
            .arg("--trust")
            .arg(&spec.publisher)
            .arg("--control-plane-key")
            .arg(&spec.control_plane)
            .env("RUST_LOG", "info");
        for (key, value) in &spec.labels {
            command.args(["--label", &format!("{key}={value}")]);
        }
        let log = spec
            .data_dir
            .with_file_name(format!("{}-{}.log", spec.id, self.starts));
        self.proc = Some(Proc::spawn(&spec.id, command, &log));
        wait_listening(self.spec.api.port(), &self.spec.id);
    }

    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// SIGKILLs the agent.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// SIGTERM, waiting for the exit; its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.proc.take().and_then(|mut proc| proc.terminate())
    }

    /// The end of the current log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.proc
            .as_ref()
            .map_or_else(String::new, |proc| proc.log_tail(lines))
    }

    /// Every log of every start, concatenated.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                let path = self
                    .spec
                    .data_dir
                    .with_file_name(format!("{}-{n}.log", self.spec.id));
                std::fs::read_to_string(path).unwrap_or_default()
            })
            .collect()
    }
}

/// A server process, agent processes, keys and a scratch directory; everything stops on drop.
pub struct Cluster {
    /// Scratch space: data directories, keys, configs, logs.
    pub dir: tempfile::TempDir,
    /// The test publisher key.
    pub keys: TestKeys,
    /// The trusted publisher's public key file.
    pub publisher: PathBuf,
    /// The server.
    pub server: ServerProc,
    /// Agents by id.
    pub agents: BTreeMap<String, AgentProc>,
    api: ApiClient,
}

impl Cluster {
    /// Starts a server with its embedded broker on a free port.
    pub fn embedded() -> Self {
        Self::start(ServerBroker::Embedded(free_port()))
    }

    /// Starts a server that joins the broker at `url`.
    pub fn external(url: &str) -> Self {
        Self::start(ServerBroker::External(url.to_owned()))
    }

    fn start(broker: ServerBroker) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let keys = TestKeys::default();
        let publisher = write_public_key(dir.path(), "publisher", &keys.publisher);
        let server = ServerProc::start(dir.path(), &publisher, broker);
        Self {
            dir,
            keys,
            publisher,
            server,
            agents: BTreeMap::new(),
            api: ApiClient::default(),
        }
    }

    /// Starts agent `id` with `labels` on the server's broker; returns its local API.
    pub fn start_agent(&mut self, id: &str, labels: &[(&str, &str)]) -> SocketAddr {
        let broker = self.server.broker_url.clone();
        self.start_agent_via(id, labels, &broker)
    }

    /// Starts agent `id` connecting to `broker` (for example a [`Relay`] in front of the
    /// server's broker).
    pub fn start_agent_via(
        &mut self,
        id: &str,
        labels: &[(&str, &str)],
        broker: &str,
    ) -> SocketAddr {
        let spec = AgentSpec {
            id: id.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            data_dir: self.dir.path().join("agents").join(id),
            broker: broker.to_owned(),
            api: SocketAddr::from(([127, 0, 0, 1], free_port())),
            publisher: self.publisher.clone(),
            control_plane: self.server.public_key(),
        };
        let api = spec.api;
        self.agents.insert(id.to_owned(), AgentProc::start(spec));
        api
    }

    /// The agent process `id`.
    pub fn agent(&mut self, id: &str) -> &mut AgentProc {
        self.agents
            .get_mut(id)
            .unwrap_or_else(|| panic!("no agent {id}"))
    }

    /// The local API address of agent `id`.
    pub fn agent_api(&self, id: &str) -> SocketAddr {
        self.agents[id].spec.api
    }

    /// The ends of the server's and every agent's logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = self.server.log_tail(30);
        for agent in self.agents.values() {
            out.push('\n');
            out.push_str(&agent.log_tail(15));
        }
        out
    }

    /// Uploads `bundle` (of [`MODEL`] at `version`) and rolls it out to every agent in one
    /// wave without bake; returns the upload answer once each of `ids` reports and serves it.
    pub async fn install_everywhere(&self, bundle: Vec<u8>, version: &str, ids: &[&str]) -> Value {
        self.wait_online(ids).await;
        let uploaded = self.upload(bundle).await;
        let id = self
            .rollout(serde_json::json!({
                "bundle": format!("{MODEL}@{version}"),
                "selector": "",
                "waves": [{ "size": { "percent": 100 }, "bake_secs": 0 }],
            }))
            .await;
        let done = self
            .wait_rollout_state(&id, &["completed", "rolled_back", "aborted"])
            .await;
        assert_eq!(done["state"], "completed", "{done:#}");
        for agent in ids {
            self.wait_reported(agent, version).await;
            self.wait_served(agent, MODEL, version).await;
        }
        uploaded
    }

    /// `method /api/v1{path}` with an optional body and `token`: status and JSON body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        token: Option<&str>,
    ) -> (u16, Value) {
        self.api.call(method, self.url(path), body, token).await
    }

    /// `GET /api/v1{path}` with `token`: status and JSON body.
    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None, token).await
    }

    /// `POST /api/v1{path}` with `body` and `token`: status and JSON body.
    pub async fn post(&self, path: &str, body: Vec<u8>, token: Option<&str>) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body), token)
            .await
    }

    /// Uploads a bundle as the operator and returns the server's answer; panics unless taken.
    pub async fn upload(&self, bundle: Vec<u8>) -> Value {
        self.api.upload(&self.url(""), bundle).await
    }

    /// Creates a rollout from `spec` as the operator; its id.
    pub async fn rollout(&self, spec: Value) -> String {
        self.api.rollout(&self.url(""), spec).await
    }

    /// Polls `GET /api/v1{path}` as a viewer until `done` holds; panics with the last answer
    /// and the processes' logs.
    pub async fn wait_api(&self, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, body) = self.try_get(path).await;
            if status == 200 && done(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what} on {path}; last answer {status}: {body:#}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the rollout reached one of the final `states`; its view.
    pub async fn wait_rollout_state(&self, id: &str, states: &[&str]) -> Value {
        self.wait_api(
            &format!("/rollouts/{id}"),
            &format!("rollout {id} in {states:?}"),
            |r| states.iter().any(|s| r["state"] == *s),
        )
        .await
    }

    /// Waits until every listed agent is online at the server.
    pub async fn wait_online(&self, ids: &[&str]) {
        for id in ids {
            self.wait_api(&format!("/agents/{id}"), &format!("{id} online"), |a| {
                a["online"] == true
            })
            .await;
        }
    }

    /// Waits until the server's record of `id` reports `version` active; the record.
    pub async fn wait_reported(&self, id: &str, version: &str) -> Value {
        self.wait_api(
            &format!("/agents/{id}"),
            &format!("{id} reporting {version} active"),
            |a| a["active"]["version"] == version,
        )
        .await
    }

    /// The agent's events of `kind` at the server, oldest first.
    pub async fn events(&self, agent: &str, kind: &str) -> Vec<Value> {
        let (status, page) = self
            .try_get(&format!("/events?agent={agent}&kind={kind}&limit=1000"))
            .await;
        assert_eq!(status, 200, "events: {page}");
        page["events"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until an event of `agent` and `kind` after event id `after` satisfies `done`.
    pub async fn wait_event(
        &self,
        agent: &str,
        kind: &str,
        after: u64,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let path = format!("/events?agent={agent}&kind={kind}&after={after}&limit=1000");
        let page = self
            .wait_api(&path, &format!("a {kind} event of {agent}"), |page| {
                page["events"]
                    .as_array()
                    .is_some_and(|events| events.iter().any(&done))
            })
            .await;
        page["events"]
            .as_array()
            .and_then(|events| events.iter().find(|e| done(e)).cloned())
            .expect("the event was just seen")
    }

    /// The id of the newest event in the log (0 when empty).
    pub async fn last_event_id(&self) -> u64 {
        let mut after = 0;
        loop {
            let (_, page) = self
                .try_get(&format!("/events?after={after}&limit=1000"))
                .await;
            match page["next_after"].as_u64() {
                Some(next) if next > after => after = next,
                _ => {
                    let last = page["events"]
                        .as_array()
                        .and_then(|e| e.last())
                        .and_then(|e| e["id"].as_u64());
                    return last.unwrap_or(after).max(after);
                }
            }
        }
    }

    /// The server's Prometheus metric `name` (summed over its label sets).
    pub async fn server_metric(&self, name: &str) -> f64 {
        let url = format!("http://{}/metrics", self.server.api);
        let (_, text) = self.api.call(reqwest::Method::GET, url, None, None).await;
        metric(text.as_str().expect("metrics are text"), name)
    }

    /// The version and digest agent `id` serves of [`MODEL`]; panics when it serves none.
    pub async fn served_release(&self, id: &str) -> (String, String) {
        let body = self
            .served(id, MODEL)
            .await
            .unwrap_or_else(|e| panic!("{id} serves no model: {e}"));
        (
            body["versions"][0].as_str().unwrap_or_default().to_owned(),
            body["parameters"]["digest"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    }

    /// What agent `id`'s local API says about the model: its metadata, or the error answer.
    pub async fn served(&self, id: &str, model: &str) -> Result<Value, String> {
        let url = format!("http://{}/v2/models/{model}", self.agent_api(id));
        let (status, body) = self
            .api
            .try_call(reqwest::Method::GET, url, None, None)
            .await?;
        if (200..300).contains(&status) {
            Ok(body)
        } else {
            Err(format!("{status}: {body}"))
        }
    }

    /// The version agent `id` serves for `model`, or why none.
    pub async fn served_version(&self, id: &str, model: &str) -> Result<String, String> {
        let body = self.served(id, model).await?;
        body["versions"][0]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no version in {body}"))
    }

    /// Waits until agent `id` serves `version` of `model` on its local API.
    pub async fn wait_served(&self, id: &str, model: &str, version: &str) {
        wait_for(&format!("{id} serving {model}@{version}"), || async {
            match self.served_version(id, model).await {
                Ok(v) if v == version => Ok(()),
                other => Err(format!("{other:?}\n{}", self.logs())),
            }
        })
        .await;
    }

    async fn try_get(&self, path: &str) -> (u16, Value) {
        let url = self.url(path);
        // The server may be restarting: report, and let the caller poll again.
        self.api
            .try_call(reqwest::Method::GET, url, None, Some(VIEWER_TOKEN))
            .await
            .unwrap_or_else(|e| (0, Value::String(e)))
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/api/v1{path}", self.server.api)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Ask everyone at once, so the grace periods overlap; each handle then waits or kills.
        for agent in self.agents.values() {
            if let Some(proc) = &agent.proc {
                proc.send_term();
            }
        }
        for agent in self.agents.values_mut() {
            agent.terminate();
        }
        self.server.terminate();
    }
}

/// The sum of a Prometheus metric's samples named `name` in `text` (0 when absent).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How a [`Relay`] alters what the broker sends, changeable while it runs.
#[derive(Debug, Default)]
struct Alter {
    /// Bytes a second towards the client; 0: no limit.
    bytes_per_sec: AtomicU64,
    /// Payload chunks corrupted so far.
    corrupted: AtomicU32,
    /// Corrupt chunks while `corrupted` is below this.
    corrupt_until: AtomicU32,
}

/// A TCP relay in front of an MQTT broker. Towards the client it reads whole MQTT packets, so
/// it can slow them down or flip a byte of a chunk's data inside a PUBLISH and frame the packet
/// again; towards the broker it copies bytes as they come. Connections are cut and the
/// listener closed on drop.
pub struct Relay {
    /// The port clients connect to.
    pub port: u16,
    stop: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    alter: Arc<Alter>,
}

impl Relay {
    /// Listens on a free port and relays every connection, unaltered, to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let port = listener.local_addr().expect("relay address").port();
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let sockets: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let alter = Arc::new(Alter::default());
        let (stop2, sockets2, alter2) = (stop.clone(), sockets.clone(), alter.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // Polling the stop flag; nothing waits on this.
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(_) => break,
                };
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let clones = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                );
                let (Ok(c1), Ok(s1), Ok(c2), Ok(s2)) = clones else {
                    continue;
                };
                sockets2.lock().expect("relay sockets").extend([c1, s1]);
                std::thread::spawn(move || copy_bytes(c2, s2));
                let alter = alter2.clone();
                std::thread::spawn(move || copy_packets(server, client, &alter));
            }
        });
        Self {
            port,
            stop,
            sockets,
            alter,
        }
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Limits what reaches clients to about `bytes_per_sec`; `None` lifts the limit.
    pub fn set_rate(&self, bytes_per_sec: Option<u64>) {
        self.alter
            .bytes_per_sec
            .store(bytes_per_sec.unwrap_or(0), Ordering::SeqCst);
    }

    /// Corrupts the next `count` payload chunks published on a bundle's chunks topic: one byte
    /// in the middle of each chunk's data is flipped.
    pub fn corrupt_next(&self, count: u32) {
        let done = self.alter.corrupted.load(Ordering::SeqCst);
        self.alter
            .corrupt_until
            .store(done + count, Ordering::SeqCst);
    }

    /// How many chunks it has corrupted so far.
    pub fn corrupted(&self) -> u32 {
        self.alter.corrupted.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for socket in self.sockets.lock().expect("relay sockets").drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

fn copy_bytes(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Forwards MQTT packets from the broker to the client, paced and altered as `alter` says.
fn copy_packets(mut from: TcpStream, mut to: TcpStream, alter: &Alter) {
    while let Some(mut packet) = read_packet(&mut from) {
        let corrupt =
            alter.corrupted.load(Ordering::SeqCst) < alter.corrupt_until.load(Ordering::SeqCst);
        if corrupt {
            if let Some(altered) = corrupt_chunk(&packet) {
                alter.corrupted.fetch_add(1, Ordering::SeqCst);
                packet = altered;
            }
        }
        let rate = alter.bytes_per_sec.load(Ordering::SeqCst);
        if rate > 0 {
            // Pacing the stream: each packet takes the time the rate allows for its size.
            std::thread::sleep(Duration::from_secs_f64(packet.len() as f64 / rate as f64));
        }
        if to.write_all(&packet).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// One whole MQTT packet (fixed header included), or `None` at the end of the stream.
fn read_packet(from: &mut TcpStream) -> Option<Vec<u8>> {
    let mut packet = vec![0u8; 1];
    from.read_exact(&mut packet).ok()?;
    let mut length: usize = 0;
    for shift in 0..4 {
        let mut byte = [0u8; 1];
        from.read_exact(&mut byte).ok()?;
        packet.push(byte[0]);
        length |= usize::from(byte[0] & 0x7f) << (7 * shift);
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let header = packet.len();
    packet.resize(header + length, 0);
    from.read_exact(&mut packet[header..]).ok()?;
    Some(packet)
}

/// The packet with one byte of its chunk data flipped, if it is an MQTT 3.1.1 PUBLISH of a
/// payload chunk on a bundle's chunks topic.
fn corrupt_chunk(packet: &[u8]) -> Option<Vec<u8>> {
    let first = packet[0];
    if first >> 4 != 3 {
        return None;
    }
    let mut at = 1;
    while packet[at] & 0x80 != 0 {
        at += 1;
    }
    at += 1;
    let topic_len = usize::from(u16::from_be_bytes([packet[at], packet[at + 1]]));
    let topic = std::str::from_utf8(packet.get(at + 2..at + 2 + topic_len)?).ok()?;
    if !(topic.contains("/bundles/") && topic.ends_with("/chunks")) {
        return None;
    }
    let qos = (first >> 1) & 0b11;
    let variable_end = at + 2 + topic_len + if qos > 0 { 2 } else { 0 };
    let mut envelope = Envelope::<Chunk>::decode(&packet[variable_end..]).ok()?;
    if !matches!(envelope.body.part, ChunkPart::Payload(_)) || envelope.body.data.is_empty() {
        return None;
    }
    let middle = envelope.body.data.len() / 2;
    envelope.body.data[middle] ^= 0xff;
    let payload = envelope.encode();

    let mut body = packet[at..variable_end].to_vec();
    body.extend_from_slice(&payload);
    let mut out = vec![first];
    let mut length = body.len();
    loop {
        let mut byte = (length % 128) as u8;
        length /= 128;
        if length > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if length == 0 {
            break;
        }
    }
    out.extend_from_slice(&body);
    Some(out)
}
