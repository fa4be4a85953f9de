//! The server's TOML configuration, with command-line overrides applied by the CLI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flotilla_agent::config::BrokerConfig;
use flotilla_shared::PublicKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Default REST API address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default address of the embedded MQTT broker.
pub const DEFAULT_MQTT_LISTEN: &str = "127.0.0.1:1883";
/// Largest MQTT packet the server sends or accepts: a chunk (up to 1 MiB) with its envelope.
pub const MAX_PACKET_BYTES: usize = 4 << 20;
/// Default upload limit: bundles larger than this are refused with 413.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 2 << 30;

/// Everything `flotilla server` needs. Unknown fields are refused so a typo never passes
/// silently for a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Where the server keeps its state and its key.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// REST API address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Serve the REST API and the dashboard over HTTPS with this certificate; plain HTTP
    /// without it.
    #[serde(default)]
    pub api_tls: Option<ApiTls>,
    /// MQTT: the embedded broker, or an external one.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// Publisher keys a bundle must be signed with before the server accepts it.
    #[serde(default)]
    pub trust: TrustConfig,
    /// API tokens, stored hashed.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Bundles larger than this many bytes are refused.
    #[serde(default = "default_max_upload_bytes")]
    pub max_upload_bytes: u64,
    /// An agent silent for this many seconds counts as offline even without its will (the
    /// broker may have lost the will, for example when it restarted).
    #[serde(default = "default_agent_timeout_secs")]
    pub agent_timeout_secs: u64,
    /// A bundle being downloaded is held in memory until nobody has asked for a chunk of it
    /// for this many seconds; later requests read it from the store again. Default 300.
    #[serde(default = "default_bundle_hold_secs")]
    pub bundle_hold_secs: u64,
    /// Events the log keeps: older ones are removed as new ones come. Default 1,000,000; 0
    /// keeps every event.
    #[serde(default = "default_max_events")]
    pub max_events: u64,
    /// Give an agent that has never had a desired state the bundle of the last completed
    /// rollout whose selector matches it, so a new or replaced device serves what its peers
    /// serve, and move it on as later rollouts for agents like it complete. Default true;
    /// false leaves such agents without a model until a rollout names them.
    #[serde(default = "default_true")]
    pub assign_new_agents: bool,
    /// Who may register a new agent: `open` (default: its first birth registers the key it
    /// names) or `accept` (it waits, listed in `/api/v1/pending-agents`, until an admin
    /// accepts its key).
    #[serde(default)]
    pub admission: super::hub::Admission,
}

/// How the server reaches MQTT.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Address of the embedded broker's plain listener (ignored with `broker`).
    #[serde(default = "default_mqtt_listen")]
    pub listen: SocketAddr,
    /// Optional TLS listener of the embedded broker.
    #[serde(default)]
    pub tls: Option<BrokerTls>,
    /// An external broker to use as an ordinary client instead of embedding one: the same
    /// fields as an agent's `[broker]` (`url`, `ca_file`, `client_cert`, `client_key`,
    /// `username`, `password`, `keep_alive_secs`).
    #[serde(default)]
    pub external: Option<BrokerConfig>,
    /// Client id on the broker.
    #[serde(default = "default_client_id")]
    pub client_id: String,
}

/// Certificate and key of the embedded broker's TLS listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTls {
    /// Listen address.
    pub listen: SocketAddr,
    /// Certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Private key (PEM).
    pub key_file: PathBuf,
}

/// Certificate and key of the REST API's HTTPS listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTls {
    /// Certificate chain (PEM), the server's own certificate first.
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// Publisher keys for uploads.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Public key files (PEM).
    #[serde(default)]
    pub publishers: Vec<PathBuf>,
    /// Distinct publisher signatures a bundle needs.
    #[serde(default = "default_threshold")]
    pub threshold: usize,
    /// Which key set `publishers` and `threshold` are. Default 1: the fleet's first keys. Key
    /// sets pushed later (`flotilla keyset push`) are kept in the data directory.
    #[serde(default = "default_key_set")]
    pub key_set: u64,
}

fn default_key_set() -> u64 {
    1
}

/// One API token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it, for logs.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the token, hex (see `flotilla server token`).
    pub sha256: String,
}

/// What a token may do; each role includes the ones before it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read anything.
    Viewer,
    /// Upload bundles; start and steer rollouts.
    Operator,
    /// Everything, including forgetting agents.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        })
    }
}

impl Default for TrustConfig {
    fn default() -> Self {
        Self {
            publishers: Vec::new(),
            threshold: default_threshold(),
            key_set: default_key_set(),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: default_mqtt_listen(),
            tls: None,
            external: None,
            client_id: default_client_id(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            listen: default_listen(),
            api_tls: None,
            mqtt: MqttConfig::default(),
            trust: TrustConfig::default(),
            tokens: Vec::new(),
            max_upload_bytes: default_max_upload_bytes(),
            agent_timeout_secs: default_agent_timeout_secs(),
            bundle_hold_secs: default_bundle_hold_secs(),
            max_events: default_max_events(),
            assign_new_agents: true,
            admission: super::hub::Admission::default(),
        }
    }
}

impl ServerConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read server config {}", path.display()))?;
        let config: Self = toml::from_str(&text)
            .with_context(|| format!("bad server config {}", path.display()))?;
        Ok(config)
    }

    /// Checks what a parse cannot: token hashes, trust threshold, broker URL.
    pub fn validate(&self) -> Result<()> {
        for token in &self.tokens {
            let valid =
                token.sha256.len() == 64 && token.sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !valid {
                bail!(
                    "token {:?}: sha256 must be 64 hex digits (make one with `flotilla server token`)",
                    token.name
                );
            }
        }
        if self.trust.key_set == 0 {
            bail!("trust.key_set must be at least 1");
        }
        if !self.trust.publishers.is_empty() && self.trust.threshold == 0 {
            bail!("trust.threshold must be at least 1");
        }
        if self.trust.threshold > self.trust.publishers.len() && !self.trust.publishers.is_empty() {
            bail!(
                "trust.threshold {} exceeds the {} publisher key(s)",
                self.trust.threshold,
                self.trust.publishers.len()
            );
        }
        if let Some(broker) = &self.mqtt.external {
            flotilla_agent::link::mqtt_options(&self.mqtt.client_id, broker, MAX_PACKET_BYTES)
                .context("bad [mqtt.external]")?;
        }
        if self.agent_timeout_secs == 0 {
            bail!("agent_timeout_secs must be at least 1");
        }
        if self.bundle_hold_secs == 0 {
            bail!("bundle_hold_secs must be at least 1");
        }
        Ok(())
    }

    /// The publisher keys, read from their files.
    pub fn publisher_keys(&self) -> Result<Vec<PublicKey>> {
        self.trust
            .publishers
            .iter()
            .map(|path| crate::keyfile::load_public(path))
            .collect()
    }

    /// How long an agent may stay silent before it counts as offline.
    pub fn agent_timeout(&self) -> Duration {
        Duration::from_secs(self.agent_timeout_secs)
    }

    /// How long a bundle nobody downloads stays in memory.
    pub fn bundle_hold(&self) -> Duration {
        Duration::from_secs(self.bundle_hold_secs)
    }
}

/// Hex SHA-256 of a token, as the config stores it.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("flotilla-data")
}
fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN
        .parse()
        .expect("invariant: default address parses")
}
fn default_mqtt_listen() -> SocketAddr {
    DEFAULT_MQTT_LISTEN
        .parse()
        .expect("invariant: default address parses")
}
fn default_client_id() -> String {
    "flotilla-control-plane".into()
}
fn default_threshold() -> usize {
    1
}
fn default_max_upload_bytes() -> u64 {
    DEFAULT_MAX_UPLOAD_BYTES
}
fn default_agent_timeout_secs() -> u64 {
    35
}
fn default_true() -> bool {
    true
}
fn default_max_events() -> u64 {
    1_000_000
}

fn default_bundle_hold_secs() -> u64 {
    crate::distribution::DEFAULT_HOLD.as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_bad_tokens_are_refused() {
        assert!(toml::from_str::<ServerConfig>("listne = \"127.0.0.1:1\"").is_err());
        let config: ServerConfig =
            toml::from_str("[[tokens]]\nname = \"ci\"\nrole = \"operator\"\nsha256 = \"abc\"\n")
                .unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("64 hex digits"), "{err}");
    }

    #[test]
    fn bundle_hold_defaults_to_five_minutes_and_cannot_be_zero() {
        assert_eq!(
            ServerConfig::default().bundle_hold(),
            Duration::from_secs(300)
        );
        let config: ServerConfig = toml::from_str("bundle_hold_secs = 0").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("bundle_hold_secs"), "{err}");
    }

    #[test]
    fn admission_is_open_unless_the_config_asks_for_acceptance() {
        use super::super::hub::Admission;
        assert_eq!(ServerConfig::default().admission, Admission::Open);
        let config: ServerConfig = toml::from_str("admission = \"accept\"").unwrap();
        assert_eq!(config.admission, Admission::Accept);
        assert!(toml::from_str::<ServerConfig>("admission = \"closed\"").is_err());
    }

    #[test]
    fn the_event_log_keeps_a_million_events_unless_told_otherwise() {
        assert_eq!(ServerConfig::default().max_events, 1_000_000);
        let config: ServerConfig = toml::from_str("max_events = 0").unwrap();
        assert_eq!(config.max_events, 0);
    }

    #[test]
    fn external_broker_urls_are_checked() {
        let mut config = ServerConfig::default();
        config.mqtt.external = Some(BrokerConfig {
            url: "http://x".into(),
            ..BrokerConfig::default()
        });
        assert!(config.validate().is_err());
        config.mqtt.external = Some(BrokerConfig {
            url: "mqtt://broker.local:1884".into(),
            ..BrokerConfig::default()
        });
        config.validate().unwrap();
    }

    #[test]
    fn api_tls_takes_both_files_and_nothing_else() {
        let config: ServerConfig =
            toml::from_str("api_tls = { cert_file = \"api.pem\", key_file = \"api.key\" }\n")
                .unwrap();
        let tls = config.api_tls.expect("api_tls parsed");
        assert_eq!(
            (tls.cert_file, tls.key_file),
            ("api.pem".into(), "api.key".into())
        );
        for text in [
            "api_tls = { cert_file = \"api.pem\" }",
            "api_tls = { cert_file = \"a\", key_file = \"b\", ca_file = \"c\" }",
        ] {
            assert!(toml::from_str::<ServerConfig>(text).is_err(), "{text}");
        }
        assert!(
            ServerConfig::default().api_tls.is_none(),
            "plain HTTP by default"
        );
    }

    #[test]
    fn token_hash_is_sha256_hex() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
