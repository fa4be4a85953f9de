//! `flotilla demo`: the whole system on one machine, no external service.
//!
//! A control plane with its embedded broker and a fresh data directory, several real
//! `flotilla-agent` processes over two sites and two hardware classes, four releases of one
//! model packed and signed from `models/`, a traffic generator calling the agents' local APIs,
//! and four rollouts: v1 everywhere, a staged v2 that completes, a release whose self-test
//! fails (stops at the canary), and a correct but slow release that breaches the latency gate
//! and is rolled back automatically. A live view shows waves, agents per phase and gate values;
//! a summary follows, then everything stays up until Ctrl-C (or stops, with `--exit`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use flotilla_shared::Bundle;
use serde_json::{json, Value};

use crate::keyfile;
use crate::pack;
use crate::rollout::GateName;
use crate::server::config::ServerConfig;

/// The model every release is a version of.
const MODEL: &str = "tiny-bert-embed";
/// How long one scripted rollout may take before the demo gives up on it.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(180);
/// Hardware classes and sites agents are spread over.
const SITES: [&str; 2] = ["lyon", "berlin"];
const HARDWARE: [&str; 2] = ["cpu-small", "cpu-large"];

/// `flotilla demo` flags.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Agents to start (at least 4, so every wave has someone).
    #[arg(long, default_value_t = 6)]
    pub agents: usize,
    /// Stop everything after the summary instead of waiting for Ctrl-C.
    #[arg(long)]
    pub exit: bool,
    /// Directory for the demo's state (must not exist yet); default: a temporary directory,
    /// removed at the end.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The `models/` directory of this repository.
    #[arg(long)]
    pub models: Option<PathBuf>,
    /// The `flotilla-agent` binary; default: next to this executable.
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// REST API address; default: a free port on 127.0.0.1.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Embedded MQTT broker address; default: a free port on 127.0.0.1.
    #[arg(long)]
    pub mqtt_listen: Option<SocketAddr>,
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<()> {
    if args.agents < 4 {
        bail!("--agents must be at least 4 (the demo's waves need them)");
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(demo(args))
}

/// One release the demo packs.
struct Release {
    version: &'static str,
    sequence: u64,
    /// Which committed model directory it is made from.
    source: &'static str,
    what: &'static str,
}

const RELEASES: [Release; 4] = [
    Release {
        version: "1.0.0",
        sequence: 1,
        source: "tiny-bert-embed",
        what: "first release",
    },
    Release {
        version: "2.0.0",
        sequence: 2,
        source: "tiny-bert-embed",
        what: "a good update",
    },
    Release {
        version: "2.1.0",
        sequence: 3,
        source: "tiny-bert-selftest-fail",
        what: "fails its self-test",
    },
    Release {
        version: "3.0.0",
        sequence: 4,
        source: "tiny-bert-embed-deep",
        what: "correct but several times slower",
    },
];

/// The release a device joining after the scripted rollouts is given: the last one that
/// completed.
const NEWCOMER_JOINS_AT: &str = "2.0.0";

/// What a scripted rollout is expected to end as.
struct Step {
    title: &'static str,
    version: &'static str,
    spec: Value,
    expect: &'static str,
}

fn steps(agents: usize) -> Vec<Step> {
    // Every process shares the machine's cores, which makes p99 noisy: the same model has
    // measured up to twice its own earlier p99 under the demo's traffic, the slow release
    // five to eight times.
    let gates = json!({ "max_error_rate": 0.02, "max_p99_ratio": 2.5 });
    vec![
        Step {
            title: "v1 to every agent",
            version: "1.0.0",
            spec: json!({
                "bundle": format!("{MODEL}@1.0.0"),
                "selector": "",
                "waves": [{ "size": { "percent": 100 }, "bake_secs": 1 }],
            }),
            expect: "completed",
        },
        Step {
            title: "v2, staged: a canary, then half, then the rest, under traffic",
            version: "2.0.0",
            spec: json!({
                "bundle": format!("{MODEL}@2.0.0"),
                "selector": format!("site in ({})", SITES.join(", ")),
                "waves": [
                    { "size": { "count": 1 }, "bake_secs": 4 },
                    { "size": { "percent": 50 }, "bake_secs": 4 },
                    { "size": { "percent": 100 }, "bake_secs": 3 },
                ],
                "stratify_by": "hw",
                "gates": gates,
            }),
            expect: "completed",
        },
        Step {
            title: "v2.1, whose self-test fails: stops at the canary",
            version: "2.1.0",
            spec: json!({
                "bundle": format!("{MODEL}@2.1.0"),
                "selector": "",
                "waves": [
                    { "size": { "count": 1 }, "bake_secs": 3 },
                    { "size": { "percent": 100 }, "bake_secs": 3 },
                ],
            }),
            expect: "rolled_back",
        },
        Step {
            title: "v3, correct but slow: the p99 gate rolls the canary back",
            version: "3.0.0",
            spec: json!({
                "bundle": format!("{MODEL}@3.0.0"),
                "selector": "",
                "waves": [
                    { "size": { "count": 2.min(agents) }, "bake_secs": 6 },
                    { "size": { "percent": 100 }, "bake_secs": 3 },
                ],
                "stratify_by": "hw",
                "gates": gates,
            }),
            expect: "rolled_back",
        },
    ]
}

async fn demo(args: &DemoArgs) -> Result<()> {
    let started = Instant::now();
    let agent_bin = agent_binary(args.agent_bin.as_deref())?;
    let models = models_dir(args.models.as_deref())?;
    let (root, _temp) = match &args.dir {
        Some(dir) => {
            if dir.exists() {
                bail!(
                    "{} already exists; the demo starts from a fresh directory",
                    dir.display()
                );
            }
            std::fs::create_dir_all(dir)?;
            (dir.clone(), None)
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("flotilla-demo-")
                .tempdir()?;
            (temp.path().to_owned(), Some(temp))
        }
    };

    println!(
        "Flotilla demo: a control plane, {} agents, four releases of {MODEL}",
        args.agents
    );
    println!();

    // Keys and bundles.
    let keys_dir = root.join("keys");
    let publisher = keyfile::generate("publisher", &keys_dir)?;
    let signing = keyfile::load_secret(&publisher.secret)?;
    println!("[1/5] keys      publisher key {}…", &publisher.id[..16]);
    let mut bundles = Vec::new();
    for release in &RELEASES {
        let bytes = pack_release(&models, release, &signing, &root.join("work"))?;
        println!(
            "      bundle    {MODEL} {:<6} {:>7} bytes  {}",
            release.version,
            bytes.len(),
            release.what
        );
        bundles.push(bytes);
    }

    // The control plane.
    let mut config = ServerConfig {
        data_dir: root.join("control-plane"),
        listen: args.listen.unwrap_or(loopback(free_port()?)),
        ..ServerConfig::default()
    };
    config.mqtt.listen = args.mqtt_listen.unwrap_or(loopback(free_port()?));
    config.trust.publishers = vec![publisher.public.clone()];
    config.agent_timeout_secs = 10;
    let server = crate::server::start(config.clone()).await?;
    let token = server
        .admin_token
        .clone()
        .context("the demo's server has a generated admin token")?;
    let api = Api::new(server.api_addr, token.clone());
    println!(
        "[2/5] server    API http://{}/api/v1   MQTT mqtt://{} (embedded)",
        server.api_addr, config.mqtt.listen
    );

    // Agents.
    let mut fleet = Agents::default();
    for i in 0..args.agents {
        let site = SITES[i % SITES.len()];
        let hw = HARDWARE[(i / SITES.len()) % HARDWARE.len()];
        let id = format!("edge-{site}-{}", i / SITES.len() + 1);
        fleet.start(
            &agent_bin,
            &id,
            &[("site", site), ("hw", hw)],
            &root,
            &config,
            &publisher.public,
        )?;
    }
    api.wait_online(args.agents).await?;
    println!("[3/5] agents    {}", fleet.describe());

    for bytes in bundles {
        api.upload(bytes).await?;
    }
    println!(
        "[4/5] pushed    {} bundles to the control plane",
        RELEASES.len()
    );

    println!("[5/5] rollouts");
    let mut traffic: Option<Traffic> = None;
    let mut outcomes = Vec::new();
    for (n, step) in steps(args.agents).into_iter().enumerate() {
        println!();
        if n == 1 {
            // Once every agent serves a model: from here on, no request should fail.
            traffic = Some(Traffic::start(fleet.apis()));
            println!("  traffic: every agent's /v1/embed is called continuously from now on");
        }
        println!("  ({}) {}", n + 1, step.title);
        let id = api.start_rollout(&step.spec).await?;
        let done = watch(&api, &id, traffic.as_ref()).await?;
        let state = done["state"].as_str().unwrap_or("?").to_owned();
        println!("      → {}", describe_outcome(&done));
        outcomes.push((step, id, state, done));
    }

    // A replacement device: no rollout names it, yet it serves what its peers were given.
    println!();
    println!(
        "  ({}) a replacement device joins after the rollouts",
        outcomes.len() + 1
    );
    let newcomer = format!("edge-{}-new", SITES[0]);
    fleet.start(
        &agent_bin,
        &newcomer,
        &[("site", SITES[0]), ("hw", HARDWARE[0])],
        &root,
        &config,
        &publisher.public,
    )?;
    let joined = api.wait_serving(&newcomer).await?;
    println!(
        "      → {newcomer} serves {MODEL}@{joined}, the release completed for agents like it"
    );

    println!();
    println!("Summary ({:.0} s)", started.elapsed().as_secs_f64());
    let mut as_expected = true;
    for (step, id, state, _) in &outcomes {
        let ok = state == step.expect;
        as_expected &= ok;
        println!(
            "  {} {:<28} {MODEL}@{:<6} {:<12} (expected {})",
            if ok { "✓" } else { "✗" },
            id,
            step.version,
            state,
            step.expect
        );
    }
    let joined_as_expected = joined == NEWCOMER_JOINS_AT;
    as_expected &= joined_as_expected;
    println!(
        "  {} {newcomer:<28} joined at {MODEL}@{joined:<6}   (expected {NEWCOMER_JOINS_AT})",
        if joined_as_expected { "✓" } else { "✗" },
    );
    let agents = api.get("/agents").await?;
    let mut serving = std::collections::BTreeMap::<String, usize>::new();
    for agent in agents.as_array().into_iter().flatten() {
        *serving
            .entry(served_version(&fleet, agent).await)
            .or_default() += 1;
    }
    println!(
        "  agents serve (asked on their own APIs): {}",
        serving
            .iter()
            .map(|(v, n)| format!("{v} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(traffic) = &traffic {
        println!(
            "  traffic during rollouts: {} requests answered, {} failed",
            traffic.ok.load(Ordering::Relaxed),
            traffic.failed.load(Ordering::Relaxed)
        );
    }

    if !args.exit {
        println!();
        println!("Everything stays up until Ctrl-C:");
        println!(
            "  API       http://{}/api/v1   (token: {token})",
            server.api_addr
        );
        println!("  dashboard http://{}/#token={token}", server.api_addr);
        println!("  OpenAPI   http://{}/api/v1/openapi.json", server.api_addr);
        println!("  metrics   http://{}/metrics", server.api_addr);
        println!("  MQTT      mqtt://{}", config.mqtt.listen);
        for (id, api) in fleet.list() {
            println!("  {id:<16} http://{api}/v2   http://{api}/metrics");
        }
        println!(
            "  try       FLOTILLA_SERVER=http://{} FLOTILLA_TOKEN={token} flotilla rollout list",
            server.api_addr
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    if let Some(traffic) = &traffic {
        traffic.stop();
    }
    fleet.stop_all();
    server.stop().await?;
    if !as_expected {
        bail!("the demo did not go as scripted; see the summary above");
    }
    Ok(())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn agent_binary(given: Option<&Path>) -> Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()?
            .parent()
            .context("this executable has no directory")?
            .join("flotilla-agent"),
    };
    if !path.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release` (or pass --agent-bin)",
            path.display()
        );
    }
    Ok(path)
}

fn models_dir(given: Option<&Path>) -> Result<PathBuf> {
    let candidates = match given {
        Some(path) => vec![path.to_owned()],
        None => vec![
            PathBuf::from("models"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"),
        ],
    };
    candidates
        .into_iter()
        .find(|p| p.join(MODEL).join("bundle.toml").is_file())
        .context("cannot find the repository's models/ directory; pass --models")
}

/// Packs and signs one release from a copy of a committed model directory.
fn pack_release(
    models: &Path,
    release: &Release,
    key: &flotilla_shared::SecretKey,
    work: &Path,
) -> Result<Vec<u8>> {
    let dir = work.join(release.version);
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(models.join(release.source))? {
        let entry = entry?;
        std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
    }
    pack::set_release(&dir, Some(MODEL), release.version, release.sequence)?;
    let now = crate::server::unix_ms() / 1000;
    let packed = pack::pack(&dir, now, &())?;
    let mut bundle = Bundle::parse(&packed.bytes)?;
    bundle.add_signature(key);
    Ok(bundle.to_bytes())
}

/// The `flotilla-agent` processes.
#[derive(Default)]
struct Agents {
    running: Vec<(String, String, SocketAddr, Child)>,
}

impl Agents {
    fn start(
        &mut self,
        binary: &Path,
        id: &str,
        labels: &[(&str, &str)],
        root: &Path,
        config: &ServerConfig,
        publisher: &Path,
    ) -> Result<()> {
        let dir = root.join("agents").join(id);
        std::fs::create_dir_all(&dir)?;
        let api = loopback(free_port()?);
        let log = std::fs::File::create(dir.join("agent.log"))?;
        // Every agent runs tract, the default that needs no library, so the latency story
        // (a release about five times slower than the one before) reads the same on every
        // machine, with or without ONNX Runtime installed.
        let config_file = dir.join("agent.toml");
        std::fs::write(&config_file, "[inference]\nbackends = [\"tract\"]\n")?;
        let mut command = Command::new(binary);
        command
            .arg("run")
            .arg("--config")
            .arg(&config_file)
            .args(["--id", id])
            .arg("--data-dir")
            .arg(&dir)
            .args(["--broker", &format!("mqtt://{}", config.mqtt.listen)])
            .args(["--listen", &api.to_string()])
            .arg("--trust")
            .arg(publisher)
            .arg("--control-plane-key")
            .arg(
                config
                    .data_dir
                    .join(format!("{}.pub", crate::server::KEY_NAME)),
            )
            .args(["--heartbeat-secs", "1"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (key, value) in labels {
            command.args(["--label", &format!("{key}={value}")]);
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        self.running.push((id.to_owned(), labels, api, child));
        Ok(())
    }

    fn apis(&self) -> Vec<SocketAddr> {
        self.running.iter().map(|(_, _, api, _)| *api).collect()
    }

    fn list(&self) -> impl Iterator<Item = (&str, SocketAddr)> {
        self.running
            .iter()
            .map(|(id, _, api, _)| (id.as_str(), *api))
    }

    fn api_of(&self, id: &str) -> Option<SocketAddr> {
        self.list().find(|(i, _)| *i == id).map(|(_, api)| api)
    }

    fn describe(&self) -> String {
        self.running
            .iter()
            .map(|(id, labels, _, _)| format!("{id} ({labels})"))
            .collect::<Vec<_>>()
            .join("\n                ")
    }

    /// SIGTERM every agent (a clean goodbye), then wait for each.
    fn stop_all(&mut self) {
        for (_, _, _, child) in &mut self.running {
            terminate(child);
        }
        for (_, _, _, child) in &mut self.running {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.running.clear();
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for (_, _, _, child) in &mut self.running {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn terminate(child: &Child) {
    #[cfg(unix)]
    {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
    }
    #[cfg(not(unix))]
    let _ = child;
}

async fn served_version(fleet: &Agents, agent: &Value) -> String {
    let Some(api) = agent["id"].as_str().and_then(|id| fleet.api_of(id)) else {
        return "unknown".into();
    };
    let answer = async {
        reqwest::get(format!("http://{api}/v2/models/{MODEL}"))
            .await?
            .json::<Value>()
            .await
    };
    match answer.await {
        Ok(body) => body["versions"][0]
            .as_str()
            .map_or_else(|| "none".into(), |v| format!("{MODEL}@{v}")),
        Err(_) => "unreachable".into(),
    }
}

/// Requests to every agent's `/v1/embed`, one at a time per agent.
struct Traffic {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(apis: Vec<SocketAddr>) -> Self {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let client = reqwest::Client::new();
        // Paragraph-length texts, so the model's own work (not HTTP) decides the latency and
        // a slower model shows as one on either backend.
        let texts = [
            "The pressure sensor on line three reported readings within the normal range for \
             the whole shift, and the maintenance team found no leaks during the inspection \
             of the valves, pumps and connectors near the cooling unit this afternoon.",
            "今天天气很好，我们在河边散步，看到很多人在钓鱼和跑步。晚上我们一起吃饭，聊了很多关于\
             工作和生活的事情，大家都觉得这样的周末非常放松。",
            "Machine learning at the edge keeps data close to where it is produced, cuts the \
             round trip to a data centre, and keeps working when the network link to the \
             control plane is slow, expensive or simply gone for a while.",
            "我爱 machine learning! Models that run on small devices need careful packaging, \
             signed updates, health checks and a way back when a new version misbehaves.",
        ];
        let tasks = apis
            .into_iter()
            .map(|api| {
                let (ok, failed, client) = (ok.clone(), failed.clone(), client.clone());
                tokio::spawn(async move {
                    for text in texts.iter().cycle() {
                        let answer = client
                            .post(format!("http://{api}/v1/embed"))
                            .json(&json!({ "inputs": [text] }))
                            .send()
                            .await;
                        match answer {
                            Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                })
            })
            .collect();
        Self { ok, failed, tasks }
    }

    fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The control plane's API, as an operator would call it.
struct Api {
    base: String,
    token: String,
    client: reqwest::Client,
}

impl Api {
    fn new(addr: SocketAddr, token: String) -> Self {
        Self {
            base: format!("http://{addr}/api/v1"),
            token,
            client: reqwest::Client::new(),
        }
    }

    async fn get(&self, path: &str) -> Result<Value> {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        answer(response).await
    }

    async fn upload(&self, bytes: Vec<u8>) -> Result<Value> {
        let response = self
            .client
            .post(format!("{}/bundles", self.base))
            .bearer_auth(&self.token)
            .body(bytes)
            .send()
            .await?;
        answer(response).await
    }

    async fn start_rollout(&self, spec: &Value) -> Result<String> {
        let response = self
            .client
            .post(format!("{}/rollouts", self.base))
            .bearer_auth(&self.token)
            .json(spec)
            .send()
            .await?;
        let body = answer(response).await?;
        Ok(body["id"].as_str().unwrap_or_default().to_owned())
    }

    /// Waits until `agent` reports serving a model; returns its version.
    async fn wait_serving(&self, agent: &str) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let record = self.get(&format!("/agents/{agent}")).await.ok();
            let version = record
                .as_ref()
                .and_then(|r| r["active"]["version"].as_str())
                .map(str::to_owned);
            if let Some(version) = version {
                return Ok(version);
            }
            if Instant::now() > deadline {
                bail!("{agent} served nothing after 60 s (log: agents/{agent}/agent.log)");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_online(&self, agents: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let fleet = self.get("/fleet").await?;
            if fleet["online"].as_u64() >= Some(agents as u64) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {agents} agents came online in 60 s (logs: agents/*/agent.log)",
                    fleet["online"]
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn answer(response: reqwest::Response) -> Result<Value> {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "API answered {status}: {}",
            body["error"].as_str().unwrap_or("?")
        );
    }
    Ok(body)
}

/// Follows a rollout until it ends, printing a line whenever its picture changes.
async fn watch(api: &Api, id: &str, traffic: Option<&Traffic>) -> Result<Value> {
    let deadline = Instant::now() + ROLLOUT_TIMEOUT;
    let mut last = String::new();
    loop {
        let view = api.get(&format!("/rollouts/{id}")).await?;
        let line = progress_line(&view);
        if line != last {
            match traffic {
                Some(t) => println!(
                    "      {line}   [traffic {} ok / {} failed]",
                    t.ok.load(Ordering::Relaxed),
                    t.failed.load(Ordering::Relaxed)
                ),
                None => println!("      {line}"),
            }
            last = line;
        }
        let state = view["state"].as_str().unwrap_or_default();
        if matches!(state, "completed" | "rolled_back" | "aborted" | "paused") {
            return Ok(view);
        }
        if Instant::now() > deadline {
            bail!(
                "rollout {id} did not finish in {} s",
                ROLLOUT_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `wave 2/3 baking   active 3 · installing 1 · waiting 2   p99_ratio 1.08 ≤ 3 ✓ …`
fn progress_line(view: &Value) -> String {
    let waves = view["waves"].as_array().cloned().unwrap_or_default();
    let state = view["state"].as_str().unwrap_or("?");
    let stage = match view["current_wave"].as_u64() {
        Some(i) => format!(
            "wave {}/{} {}",
            i + 1,
            waves.len(),
            view["status"]["stage"].as_str().unwrap_or(state)
        ),
        None => state.replace('_', " "),
    };
    let phases = view["phases"]
        .as_object()
        .map(|p| {
            p.iter()
                .map(|(k, v)| format!("{} {v}", k.replace('_', " ")))
                .collect::<Vec<_>>()
                .join(" · ")
        })
        .unwrap_or_default();
    let wave = view["current_wave"]
        .as_u64()
        .and_then(|i| waves.get(i as usize))
        .or_else(|| {
            waves
                .iter()
                .rev()
                .find(|w| !w["gates"].as_array().is_none_or(|g| g.is_empty()))
        });
    let gates = wave
        .and_then(|w| w["gates"].as_array())
        .map(|gates| {
            gates
                .iter()
                .filter(|g| !g["value"].is_null())
                .map(gate_text)
                .collect::<Vec<_>>()
                .join("  ")
        })
        .unwrap_or_default();
    format!("{stage:<18} {phases:<44} {gates}")
}

fn gate_text(gate: &Value) -> String {
    let name = gate["gate"].as_str().unwrap_or("?");
    let value = gate["value"].as_f64().unwrap_or(f64::NAN);
    let limit = gate["threshold"].as_f64().unwrap_or(f64::NAN);
    let relation = if name == "reporting" { "≥" } else { "≤" };
    let mark = if gate["passed"] == true { "✓" } else { "✗" };
    format!("{name} {value:.2} {relation} {limit} {mark}")
}

fn describe_outcome(view: &Value) -> String {
    let state = view["state"].as_str().unwrap_or("?");
    match state {
        "completed" => format!(
            "completed: {} agents on the new version, every wave passed its gates",
            view["phases"]["active"].as_u64().unwrap_or(0)
        ),
        "rolled_back" => {
            let failure = &view["failure"];
            let reverted: Vec<&str> = view["agents"]
                .as_object()
                .map(|agents| {
                    agents
                        .iter()
                        .filter(|(_, a)| !a["assigned_ms"].is_null())
                        .map(|(id, _)| id.as_str())
                        .collect()
                })
                .unwrap_or_default();
            let reasons: Vec<String> = view["agents"]
                .as_object()
                .map(|agents| {
                    agents
                        .iter()
                        .filter_map(|(id, a)| {
                            a["phase"]["reason"].as_str().map(|r| format!("{id}: {r}"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut text = format!(
                "rolled back at wave {}: gate {} measured {:.2} against a limit of {} (over {}); {} sent back to the previous version: {}",
                failure["wave"].as_u64().map_or(0, |w| w + 1),
                failure["gate"].as_str().unwrap_or("?"),
                failure["value"].as_f64().unwrap_or(f64::NAN),
                failure["threshold"],
                basis_text(&failure["gate"], &failure["basis"]),
                reverted.len(),
                reverted.join(", ")
            );
            if let Some(comparison) = view["waves"][failure["wave"].as_u64().unwrap_or(0) as usize]
                .get("comparison")
                .filter(|c| !c["new"]["p99_ms"].is_null())
            {
                text.push_str(&format!(
                    "\n        new p99 {} ms vs previous p99 {} ms on the same agents",
                    number(&comparison["new"]["p99_ms"]),
                    number(&comparison["previous"]["p99_ms"])
                ));
            }
            for reason in reasons {
                text.push_str(&format!("\n        {reason}"));
            }
            text
        }
        other => other.to_owned(),
    }
}

fn number(value: &Value) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

/// A gate's basis with what it counts, from an API document's gate and basis.
fn basis_text(gate: &Value, basis: &Value) -> String {
    let basis = basis.as_u64().unwrap_or(0);
    serde_json::from_value::<GateName>(gate.clone())
        .map_or_else(|_| basis.to_string(), |gate| gate.basis_text(basis))
}
