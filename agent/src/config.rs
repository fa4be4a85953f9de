//! Agent configuration: a TOML file (unknown fields rejected), overridden by CLI flags and
//! environment variables. Every field is documented with its default in `agent/agent.example.toml`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::runtime::{GpuProviders, OrtSettings, Placement, Provider};
use anyhow::{bail, Context, Result};
use flotilla_shared::manifest::Backend;
use flotilla_shared::wire::check_agent_id;
use serde::Deserialize;

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Agent id, unique in the fleet: 1-64 of `[A-Za-z0-9._-]`. Default: the host name.
    #[serde(default = "default_agent_id")]
    pub id: String,
    /// Free-form labels for rollout selectors (site, region, hardware class...). Default: none.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where bundles, models and state live. Default: `/var/lib/flotilla-agent`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Connection to the control plane's broker.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Which bundles to trust.
    #[serde(default)]
    pub trust: TrustConfig,
    /// The local HTTP API.
    #[serde(default)]
    pub api: ApiConfig,
    /// Inference settings.
    #[serde(default)]
    pub inference: InferenceConfig,
    /// Seconds between heartbeats. Default 10.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
    /// Offline telemetry buffer size, in items. Default 10000. Heartbeats are dropped before
    /// events when it is full.
    #[serde(default = "default_outbox_capacity")]
    pub outbox_capacity: u64,
}

/// `[broker]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `mqtt://host:port` or `mqtts://host:port`. Default `mqtt://127.0.0.1:1883`.
    #[serde(default = "default_broker_url")]
    pub url: String,
    /// CA certificate (PEM) for `mqtts://`. Default: none (required for mqtts).
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS. Default: none.
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS. Default: none.
    pub client_key: Option<PathBuf>,
    /// MQTT user name. Default: none.
    pub username: Option<String>,
    /// MQTT password. Default: none.
    pub password: Option<String>,
    /// Keep-alive in seconds; the watchdog declares the link dead after twice this with no
    /// traffic. Default 15.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
}

/// `[trust]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Public key files of trusted bundle publishers. Default: none (no bundle is accepted).
    #[serde(default)]
    pub publishers: Vec<PathBuf>,
    /// Distinct publisher signatures required. Default 1.
    #[serde(default = "default_threshold")]
    pub threshold: usize,
    /// The control plane's public key, which must sign every desired state. Default: none
    /// (desired states are all refused).
    pub control_plane: Option<PathBuf>,
    /// Which key set `publishers` and `threshold` are. Default 1: the fleet's first keys.
    /// A device set up after a rotation lists the current keys and their version, and then
    /// follows only the key sets after it.
    #[serde(default = "default_key_set")]
    pub key_set: u64,
}

/// `[api]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address. Default `127.0.0.1:8000`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Largest request body in bytes. Default 4 MiB.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Most texts or rows in one request. Default 64.
    #[serde(default = "default_max_items")]
    pub max_batch_items: usize,
    /// Dynamic batching of the text endpoints.
    #[serde(default)]
    pub batching: BatchingConfig,
}

/// `[api.batching]`: how concurrent `/v1/embed`, `/v1/classify` and `/v1/embeddings` requests
/// are run together.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Whether to batch at all; off, each request runs alone. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Most tokens in one batch, padding included (texts × widest text). Default 8192.
    #[serde(default = "default_max_batch_tokens")]
    pub max_batch_tokens: usize,
    /// Longest a forming batch waits for requests still being tokenised, in milliseconds; a
    /// request with nothing else on its way never waits. Default 2.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
    /// Requests queued or being tokenised at once; more get 429 with `Retry-After`.
    /// Default 256.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
}

/// `[inference]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceConfig {
    /// Backends the agent may use, in order of preference. Default `["ort", "tract"]`: ONNX
    /// Runtime when its library is found, else tract.
    #[serde(default = "default_backends")]
    pub backends: Vec<Backend>,
    /// Inferences running at once; more get 429. Default: the number of cores.
    #[serde(default = "default_concurrency")]
    pub max_concurrency: usize,
    /// The ONNX Runtime shared library (`libonnxruntime.so.*`). Default: the `ORT_DYLIB_PATH`
    /// environment variable; with neither, models run on tract.
    pub onnxruntime_library: Option<PathBuf>,
    /// Threads in each of the two pools every model shares: ONNX Runtime's intra-op pool (its
    /// threads never spin) and the agent's CPU pool, which tract splits large matrix products
    /// over and large requests are tokenised on. Default 0: one per core.
    #[serde(default)]
    pub intra_op_threads: usize,
    /// GPU execution providers to try before the CPU, in order: `"tensorrt"`, `"cuda"`.
    /// Default: on a host with an NVIDIA GPU, TensorRT then CUDA, each if the library has it.
    /// A provider listed here that cannot run is reported as a degradation.
    pub gpu_providers: Option<Vec<Provider>>,
    /// Seconds before a backend that failed is tried again. Default 300.
    #[serde(default = "default_retry_secs")]
    pub retry_secs: u64,
}

impl InferenceConfig {
    /// Where models may run, as the runtime takes it.
    pub fn placement(&self) -> Placement {
        Placement {
            gpu_providers: match &self.gpu_providers {
                Some(list) => GpuProviders::Listed(list.clone()),
                None => GpuProviders::Auto,
            },
            ort: OrtSettings {
                library: self.onnxruntime_library.clone(),
                intra_op_threads: self.intra_op_threads,
            },
            ..Placement::new(self.backends.clone())
        }
    }

    /// How long a failed backend waits before it is tried again.
    pub fn retry_after(&self) -> Duration {
        Duration::from_secs(self.retry_secs)
    }
}

fn default_agent_id() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| check_agent_id(h).is_ok())
        .unwrap_or_else(|| "agent".to_owned())
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/flotilla-agent")
}
fn default_broker_url() -> String {
    "mqtt://127.0.0.1:1883".to_owned()
}
fn default_keep_alive() -> u64 {
    15
}
fn default_threshold() -> usize {
    1
}
fn default_key_set() -> u64 {
    1
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8000))
}
fn default_max_body() -> usize {
    4 * 1024 * 1024
}
fn default_max_items() -> usize {
    64
}
fn default_true() -> bool {
    true
}
fn default_max_batch_tokens() -> usize {
    8192
}
fn default_max_wait_ms() -> u64 {
    2
}
fn default_max_queue() -> usize {
    256
}
fn default_backends() -> Vec<Backend> {
    vec![Backend::Ort, Backend::Tract]
}
fn default_retry_secs() -> u64 {
    300
}
fn default_concurrency() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}
fn default_heartbeat_secs() -> u64 {
    10
}
fn default_outbox_capacity() -> u64 {
    10_000
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: default_broker_url(),
            ca_file: None,
            client_cert: None,
            client_key: None,
            username: None,
            password: None,
            keep_alive_secs: default_keep_alive(),
        }
    }
}

impl Default for TrustConfig {
    fn default() -> Self {
        Self {
            publishers: Vec::new(),
            threshold: default_threshold(),
            control_plane: None,
            key_set: default_key_set(),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_body_bytes: default_max_body(),
            max_batch_items: default_max_items(),
            batching: BatchingConfig::default(),
        }
    }
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_batch_tokens: default_max_batch_tokens(),
            max_wait_ms: default_max_wait_ms(),
            max_queue: default_max_queue(),
        }
    }
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            backends: default_backends(),
            max_concurrency: default_concurrency(),
            onnxruntime_library: None,
            intra_op_threads: 0,
            gpu_providers: None,
            retry_secs: default_retry_secs(),
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        toml::from_str("").expect("invariant: every field has a default")
    }
}

impl AgentConfig {
    /// Reads a config file; relative paths inside it are taken relative to the file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read agent config {}", path.display()))?;
        let mut config: Self = toml::from_str(&text)
            .with_context(|| format!("invalid agent config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.rebase(base);
        Ok(config)
    }

    fn rebase(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        self.trust.publishers.iter_mut().for_each(fix);
        for p in [
            &mut self.trust.control_plane,
            &mut self.broker.ca_file,
            &mut self.broker.client_cert,
            &mut self.broker.client_key,
            &mut self.inference.onnxruntime_library,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<()> {
        check_agent_id(&self.id).map_err(anyhow::Error::msg)?;
        if self.heartbeat_secs == 0 {
            bail!("heartbeat_secs must be at least 1");
        }
        if self.api.batching.max_batch_tokens == 0 || self.api.batching.max_queue == 0 {
            bail!("api.batching.max_batch_tokens and max_queue must be at least 1");
        }
        if self.inference.backends.is_empty() {
            bail!("inference.backends lists no backend");
        }
        if self.trust.key_set == 0 {
            bail!("trust.key_set must be at least 1");
        }
        if !self.trust.publishers.is_empty() && self.trust.threshold > self.trust.publishers.len() {
            bail!(
                "trust.threshold {} exceeds the {} publisher key(s)",
                self.trust.threshold,
                self.trust.publishers.len()
            );
        }
        let scheme = self.broker.url.split("://").next().unwrap_or_default();
        if !matches!(scheme, "mqtt" | "mqtts") {
            bail!(
                "broker.url {:?} must start with mqtt:// or mqtts://",
                self.broker.url
            );
        }
        if scheme == "mqtts" && self.broker.ca_file.is_none() {
            bail!("broker.url is mqtts:// but broker.ca_file is not set");
        }
        if self.broker.client_cert.is_some() != self.broker.client_key.is_some() {
            bail!("broker.client_cert and broker.client_key go together");
        }
        Ok(())
    }

    /// Heartbeat period.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c: AgentConfig = toml::from_str("").unwrap();
        assert_eq!(c.api.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(c.heartbeat_secs, 10);
        assert_eq!(c.broker.url, "mqtt://127.0.0.1:1883");
        assert_eq!(c.trust.threshold, 1);
        assert_eq!(
            AgentConfig::default().trust.threshold,
            1,
            "section defaults match field defaults"
        );
        assert_eq!(c.inference.backends, vec![Backend::Ort, Backend::Tract]);
        assert_eq!(c.inference.retry_secs, 300);
        assert_eq!(c.api.batching, BatchingConfig::default());
        assert!(c.api.batching.enabled);
        assert_eq!(c.api.batching.max_wait_ms, 2);
        assert_eq!(c.inference.gpu_providers, None);
    }

    #[test]
    fn gpu_providers_and_the_library_path_reach_the_placement() {
        let c: AgentConfig = toml::from_str(
            "[inference]\ngpu_providers = [\"tensorrt\", \"cuda\"]\n\
             onnxruntime_library = \"/opt/ort/libonnxruntime.so\"\nintra_op_threads = 3",
        )
        .unwrap();
        let placement = c.inference.placement();
        assert_eq!(
            placement.gpu_providers,
            GpuProviders::Listed(vec![Provider::TensorRt, Provider::Cuda])
        );
        assert_eq!(placement.ort.intra_op_threads, 3);
        assert_eq!(
            placement.ort.library.as_deref(),
            Some(Path::new("/opt/ort/libonnxruntime.so"))
        );
        let err =
            toml::from_str::<AgentConfig>("[inference]\ngpu_providers = [\"rocm\"]").unwrap_err();
        assert!(err.to_string().contains("unknown variant `rocm`"), "{err}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = toml::from_str::<AgentConfig>("[api]\nlisten_addr = \"x\"").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `listen_addr`"),
            "{err}"
        );
    }

    #[test]
    fn example_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent.example.toml");
        let c = AgentConfig::load(&path).unwrap();
        c.validate().unwrap();
        assert!(c.data_dir.is_absolute());
    }

    #[test]
    fn nonsense_values_are_refused() {
        for (toml, message) in [
            ("id = \"a/b\"", "agent id"),
            ("heartbeat_secs = 0", "heartbeat_secs"),
            ("[broker]\nurl = \"http://x\"", "mqtt://"),
            ("[broker]\nurl = \"mqtts://x:8883\"", "ca_file"),
        ] {
            let c: AgentConfig = toml::from_str(toml).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(message), "{toml}: {err}");
        }
    }
}
