//! `flotilla server`: run the hub, and make API tokens for its config.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use flotilla_agent::config::BrokerConfig;

use crate::keyfile;
use crate::server::config::{hash_token, ApiTls, Role, ServerConfig};

/// `flotilla server [run]` flags; each overrides the config file.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Server config file (TOML).
    #[arg(long, env = "FLOTILLA_SERVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (state, key, generated admin token).
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// REST API address [default: 127.0.0.1:8080].
    #[arg(long, env = "FLOTILLA_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Serve the API over HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "FLOTILLA_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The HTTPS certificate's private key (PEM); needs --tls-cert.
    #[arg(long, env = "FLOTILLA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Embedded MQTT broker address [default: 127.0.0.1:1883].
    #[arg(long, env = "FLOTILLA_MQTT_LISTEN")]
    pub mqtt_listen: Option<SocketAddr>,
    /// Use this external broker (mqtt://host:port or mqtts://host:port) instead of embedding
    /// one.
    #[arg(long, env = "FLOTILLA_BROKER")]
    pub broker: Option<String>,
    /// Trusted publisher key file for uploads; repeat for several (added to the config's).
    #[arg(long = "trust")]
    pub trust: Vec<PathBuf>,
    /// Distinct publisher signatures an upload needs.
    #[arg(long)]
    pub threshold: Option<usize>,
}

impl ServeArgs {
    /// The config file (or defaults) with the flags applied.
    pub fn config(&self) -> Result<ServerConfig> {
        let mut config = match &self.config {
            Some(path) => ServerConfig::load(path)?,
            None => ServerConfig::default(),
        };
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let (Some(cert_file), Some(key_file)) = (&self.tls_cert, &self.tls_key) {
            config.api_tls = Some(ApiTls {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
            });
        }
        if let Some(listen) = self.mqtt_listen {
            config.mqtt.listen = listen;
        }
        if let Some(url) = &self.broker {
            let mut broker = config.mqtt.external.take().unwrap_or_default();
            broker.url = url.clone();
            config.mqtt.external = Some(BrokerConfig { ..broker });
        }
        config.trust.publishers.extend(self.trust.iter().cloned());
        if let Some(threshold) = self.threshold {
            config.trust.threshold = threshold;
        }
        config.validate()?;
        Ok(config)
    }
}

/// Runs the server until Ctrl-C or SIGTERM; SIGHUP reloads the API certificate.
pub fn run(args: &ServeArgs) -> Result<()> {
    let config = args.config()?;
    init_logging();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // Before the server starts, so that a signal sent once it answers is never the
        // default action (for SIGHUP, exiting).
        let signals = Signals::install();
        let server = crate::server::start(config.clone()).await?;
        println!("flotilla control plane");
        println!(
            "  API        {}/api/v1  (OpenAPI: /api/v1/openapi.json)",
            server.api_url
        );
        match server.mqtt_addr {
            Some(addr) => println!("  MQTT       mqtt://{addr}  (embedded broker)"),
            None => println!(
                "  MQTT       {}  (external broker)",
                config
                    .mqtt
                    .external
                    .as_ref()
                    .map_or("?", |b| b.url.as_str())
            ),
        }
        println!(
            "  agent key  {}",
            config
                .data_dir
                .join(format!("{}.pub", crate::server::KEY_NAME))
                .display()
        );
        if server.admin_token.is_some() {
            println!(
                "  token      {} (admin; no tokens configured)",
                config
                    .data_dir
                    .join(crate::server::ADMIN_TOKEN_FILE)
                    .display()
            );
        }
        signals.serve_until_stopped(&server).await;
        tracing::info!("shutting down");
        server.stop().await
    })
}

/// The signals the server acts on.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self {
                term: signal(SignalKind::terminate()).expect("invariant: SIGTERM handler installs"),
                hangup: signal(SignalKind::hangup()).expect("invariant: SIGHUP handler installs"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Waits for Ctrl-C or SIGTERM; on SIGHUP reloads the API certificate (an error is
    /// logged and the old certificate kept).
    async fn serve_until_stopped(mut self, server: &crate::server::RunningServer) {
        #[cfg(unix)]
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = self.term.recv() => break,
                _ = self.hangup.recv() => {
                    if let Err(e) = server.reload_tls() {
                        tracing::error!(error = %format!("{e:#}"), "SIGHUP: certificate not reloaded");
                    }
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = server;
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Prints a fresh random token and the config entry that accepts it.
pub fn token(name: &str, role: Role) -> Result<()> {
    let token = hex::encode(keyfile::random_seed()?);
    println!("token (give this to the client; it is not stored anywhere):");
    println!("  {token}");
    println!();
    println!("server config entry:");
    println!("[[tokens]]");
    println!("name = {name:?}");
    println!("role = \"{role}\"");
    println!("sha256 = \"{}\"", hash_token(&token));
    Ok(())
}

/// Makes a control-plane key for a key set to move to, in the server's data directory.
pub fn new_key(data_dir: &Path) -> Result<()> {
    let pair = crate::server::new_key(data_dir)?;
    println!("secret key  {}", pair.secret.display());
    println!("public key  {}", pair.public.display());
    println!("key id      {}", pair.id);
    println!();
    println!(
        "the server signs with it once a key set names it: \
         `flotilla keyset new --control-plane {} ...`, signed by the publisher keys, then pushed",
        pair.public.display()
    );
    Ok(())
}

/// Restores a backup into `data_dir` and says what still has to be copied by hand.
pub fn restore(file: &Path, data_dir: &Path) -> Result<()> {
    let summary = crate::server::backup::restore(file, data_dir)?;
    println!("restored {summary}");
    println!("into {}", data_dir.display());
    let key = crate::server::key_path(data_dir);
    if !key.exists() {
        println!();
        println!(
            "copy the old data directory's control-plane.key (and .pub), and any \
             control-plane-ID.key a key set moved to, to {} before starting the server: agents \
             trust only those keys, and a server without them makes a new one whose desired \
             states every agent refuses",
            data_dir.display()
        );
    }
    Ok(())
}

/// Checks a backup file whole and says what it holds.
pub fn check_backup(file: &Path) -> Result<()> {
    let input = std::fs::File::open(file)
        .with_context(|| format!("cannot open backup {}", file.display()))?;
    let summary = crate::server::backup::read(std::io::BufReader::new(input), |_| Ok(()))
        .with_context(|| format!("{} does not check out", file.display()))?;
    println!(
        "{} is a whole backup (taken by flotilla {} at {}): {summary}",
        file.display(),
        summary.server_version,
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(summary.created_ms)
        )
    );
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rumqttd=warn,rumqttd::server::broker=off")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
