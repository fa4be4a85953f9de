//! `flotilla-agent`: the edge agent, or a standalone server for one local bundle.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use flotilla_agent::agent::{self, ApiServer, DegradationWatch};
use flotilla_agent::config::AgentConfig;
use flotilla_agent::identity::{Identity, IDENTITY_KEY_NAME};
use flotilla_agent::install::Installer;
use flotilla_agent::metrics::Metrics;
use flotilla_agent::serving::ModelSlot;
use flotilla_agent::store::Store;
use tracing::info;
use tracing_subscriber::EnvFilter;

/// Flotilla edge agent: pulls signed model bundles and serves them on a local API.
#[derive(Debug, Parser)]
#[command(name = "flotilla-agent", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: follow the control plane, install bundles, serve the active model.
    Run(RunArgs),
    /// Serve one local bundle with the same API and no broker, for application development.
    Serve(ServeArgs),
    /// Print the agent's identity key (made now if the data directory has none), which signs
    /// its reports: compare it with what the control plane registered (`identity` in
    /// `flotilla agents --json`).
    Identity(IdentityArgs),
}

#[derive(Debug, clap::Args)]
struct IdentityArgs {
    /// Agent configuration file (TOML); only `data_dir` is read.
    #[arg(long, env = "FLOTILLA_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (overrides the file).
    #[arg(long, env = "FLOTILLA_AGENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Agent configuration file (TOML; see agent/agent.example.toml).
    #[arg(long, env = "FLOTILLA_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Agent id (overrides the file).
    #[arg(long, env = "FLOTILLA_AGENT_ID")]
    id: Option<String>,
    /// Data directory (overrides the file).
    #[arg(long, env = "FLOTILLA_AGENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Broker URL, mqtt:// or mqtts:// (overrides the file).
    #[arg(long, env = "FLOTILLA_AGENT_BROKER")]
    broker: Option<String>,
    /// Local API listen address (overrides the file).
    #[arg(long, env = "FLOTILLA_AGENT_LISTEN")]
    listen: Option<SocketAddr>,
    /// Label KEY=VALUE, repeatable (added to the file's labels).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Trusted publisher key file, repeatable (added to the file's).
    #[arg(long = "trust")]
    trust: Vec<PathBuf>,
    /// Control plane public key file (overrides the file).
    #[arg(long, env = "FLOTILLA_AGENT_CONTROL_PLANE_KEY")]
    control_plane_key: Option<PathBuf>,
    /// Seconds between heartbeats (overrides the file).
    #[arg(long, env = "FLOTILLA_AGENT_HEARTBEAT_SECS")]
    heartbeat_secs: Option<u64>,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Bundle file to serve.
    #[arg(long)]
    bundle: PathBuf,
    /// Agent configuration file whose [api], [inference], trust.publishers and
    /// trust.threshold apply (the rest is ignored: serving needs no broker and keeps nothing).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Trusted publisher key file, repeatable (added to the file's; at least one in all).
    #[arg(long = "trust")]
    trust: Vec<PathBuf>,
    /// Distinct trusted signatures required (overrides the file; default 1).
    #[arg(long)]
    threshold: Option<usize>,
    /// Listen address (overrides the file; default 127.0.0.1:8000).
    #[arg(long)]
    listen: Option<SocketAddr>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label {s:?} must be KEY=VALUE"))?;
    Ok((k.to_owned(), v.to_owned()))
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("invariant: a tokio runtime can start");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Serve(args) => serve(args).await,
            Command::Identity(args) => identity(args),
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    if let Some(id) = args.id {
        config.id = id;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(url) = args.broker {
        config.broker.url = url;
    }
    if let Some(listen) = args.listen {
        config.api.listen = listen;
    }
    config.labels.extend(args.labels);
    config.trust.publishers.extend(args.trust);
    if let Some(key) = args.control_plane_key {
        config.trust.control_plane = Some(key);
    }
    if let Some(secs) = args.heartbeat_secs {
        config.heartbeat_secs = secs;
    }
    info!(agent = %config.id, broker = %config.broker.url, "starting agent");
    agent::run(config, shutdown_signal()).await
}

fn identity(args: IdentityArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    let public = Identity::load_or_create(&config.data_dir)?.public();
    println!("key id   {}", public.id().0.to_hex());
    println!("identity {}", hex::encode(public.to_bytes()));
    println!(
        "file     {}",
        config
            .data_dir
            .join(format!("{IDENTITY_KEY_NAME}.pub"))
            .display()
    );
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    config.trust.publishers.extend(args.trust);
    if let Some(threshold) = args.threshold {
        config.trust.threshold = threshold;
    }
    if let Some(listen) = args.listen {
        config.api.listen = listen;
    }
    if config.trust.publishers.is_empty() {
        bail!("no trusted publisher key: pass --trust KEY (or list trust.publishers in --config)");
    }
    // Desired states come from a control plane, and here there is none.
    config.trust.control_plane = None;
    config.validate()?;
    let trust = agent::load_trust(&config)?;
    let bytes = std::fs::read(&args.bundle)
        .with_context(|| format!("cannot read bundle {}", args.bundle.display()))?;
    // A scratch data directory: standalone mode keeps nothing between runs.
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let placement = config.inference.placement();
    let installer = Installer::new(
        Store::open(scratch.path())?,
        trust,
        placement.backends.clone(),
    )
    .with_placement(placement);

    let staged = tokio::task::spawn_blocking(move || {
        let verified = installer.verify_new(&bytes)?;
        installer.stage(&verified, &bytes)
    })
    .await?
    .with_context(|| format!("cannot serve {}", args.bundle.display()))?;

    let slot = Arc::new(ModelSlot::new(config.inference.max_concurrency));
    let metrics = Arc::new(Metrics::new());
    metrics.model_loaded(&staged.served);
    metrics.set_self_test(staged.served.digest, true);
    info!(model = %staged.served.manifest.id(), "self-tests passed");
    slot.activate(staged.served.clone());

    let api = ApiServer::start(&config.api, slot.clone(), metrics).await?;
    println!(
        "serving {} on http://{}",
        staged.served.manifest.id(),
        api.addr
    );
    // No heartbeat here to hang the degradation check on: a timer does it.
    let retry_after = config.inference.retry_after();
    let watch = tokio::spawn(async move {
        let watch = DegradationWatch::default();
        let mut ticks = tokio::time::interval(retry_after.clamp(WATCH_MIN, WATCH_MAX));
        loop {
            ticks.tick().await;
            watch.check(&staged.served, retry_after);
        }
    });
    shutdown_signal().await;
    watch.abort();
    api.stop().await;
    Ok(())
}

/// Bounds on how often `serve` looks at the model's degradation: as often as a failed engine
/// may be retried, within these.
const WATCH_MIN: Duration = Duration::from_secs(1);
const WATCH_MAX: Duration = Duration::from_secs(10);

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
