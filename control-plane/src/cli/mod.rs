//! The `flotilla` command line: argument definitions and dispatch.

mod bundle;
mod demo;
mod keyset;
mod remote;
mod server;

pub use demo::DemoArgs;
pub use remote::rollouts::StartArgs;
pub use remote::{ApiFailure, RemoteArgs};
pub use server::ServeArgs;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

/// Flotilla: signed ONNX model bundles for edge fleets, and the control plane that rolls them out.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about, max_term_width = 100)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an ed25519 key pair: NAME.key (secret, mode 0600) and NAME.pub.
    Keygen {
        /// Base name of the key files.
        name: String,
        /// Directory to write them to.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Pack, sign, verify and inspect bundles.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Start, list, inspect and steer staged rollouts on a control plane.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Replace the publisher keys the fleet trusts: make, sign and inspect key sets, and push
    /// them to a control plane, which sends them to every agent.
    #[command(subcommand)]
    Keyset(KeysetCommand),
    /// List a control plane's agents: presence, version, health, heartbeat, labels; list and
    /// accept those waiting to join; forget one.
    Agents {
        /// `pending`, `approved`, `accept ID --key KEY_ID` or `forget ID`; nothing to list the
        /// agents.
        #[command(subcommand)]
        command: Option<AgentsCommand>,
        /// Only agents this label selector matches, e.g. `site=berlin,hw in (cpu,gpu)`.
        #[arg(long, value_name = "EXPR")]
        selector: Option<String>,
        /// Only agents connected now.
        #[arg(long, conflicts_with = "offline")]
        online: bool,
        /// Only agents not connected now.
        #[arg(long)]
        offline: bool,
        /// Agents asked for per request (the server answers at most 1000).
        #[arg(long, value_name = "N", default_value_t = 500,
              value_parser = clap::value_parser!(u16).range(1..=1000))]
        page_size: u16,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Server and token.
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Read a control plane's event log, oldest first.
    Events(EventsArgs),
    /// Download a backup of a running control plane's state (admin), checked before it is
    /// kept; `flotilla server restore` puts it back.
    Backup {
        /// File to write; replaced only once the new backup has checked out.
        #[arg(long)]
        out: PathBuf,
        /// Server and token.
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Run the whole system locally: a control plane, agents, staged rollouts, rollbacks.
    Demo(DemoArgs),
    /// Run the control plane (embedded MQTT broker unless --broker), make API tokens or a new
    /// control-plane key, or restore a backup.
    Server {
        /// `token` to make an API token, `new-key` to make a control-plane key, `restore` to
        /// restore a backup; nothing to run the server.
        #[command(subcommand)]
        command: Option<ServerCommand>,
        /// Flags for running the server.
        #[command(flatten)]
        args: ServeArgs,
    },
}

/// `flotilla agents ...`.
#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// List agents waiting to be accepted: new ones (with `admission = "accept"`) and known
    /// ones that came back with another key.
    Pending {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Server and token.
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// List keys approved ahead and not used yet (new agents and replacement devices).
    Approved {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Server and token.
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Accept the key a pending agent offers (admin). Compare the key with what
    /// `flotilla-agent identity` prints on the device first. Any other key is approved ahead:
    /// the next connection with it registers, and for a registered agent (a replacement
    /// device) takes the id over once the agent is offline and in no active rollout.
    Accept {
        /// The agent's id.
        id: String,
        /// The whole key id it must offer (64 hex digits), as `flotilla-agent identity`
        /// prints it and `agents pending` lists it.
        #[arg(long = "key", value_name = "KEY_ID")]
        key: String,
        /// Server and token.
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Forget an offline agent in no active rollout (admin), with the key registered for it
    /// and any birth of it waiting for acceptance.
    Forget {
        /// The agent's id.
        id: String,
        /// Server and token.
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

/// `flotilla server ...`.
#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Print a new random API token and the `[[tokens]]` entry (its SHA-256) for the config.
    Token {
        /// Who will hold it, for logs.
        #[arg(long)]
        name: String,
        /// viewer (read), operator (bundles and rollouts) or admin.
        #[arg(long, value_parser = parse_role)]
        role: crate::server::config::Role,
    },
    /// Make a new control-plane key in a server's data directory, for a key set to move the
    /// fleet to (`flotilla keyset new --control-plane`); the running server picks it up when
    /// that key set is pushed.
    NewKey {
        /// The server's data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Restore a backup made by `flotilla backup` into a data directory that holds no
    /// database yet; then start the server on it. With --check, only check the file.
    Restore {
        /// The backup file.
        file: PathBuf,
        /// The new data directory.
        #[arg(long, required_unless_present = "check")]
        data_dir: Option<PathBuf>,
        /// Check the whole file and say what it holds; write nothing.
        #[arg(long, conflicts_with = "data_dir")]
        check: bool,
    },
}

fn parse_role(text: &str) -> Result<crate::server::config::Role, String> {
    use crate::server::config::Role;
    match text {
        "viewer" => Ok(Role::Viewer),
        "operator" => Ok(Role::Operator),
        "admin" => Ok(Role::Admin),
        other => Err(format!("unknown role {other:?}: viewer, operator or admin")),
    }
}

/// `flotilla bundle ...`.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Pack MODEL_DIR (which holds bundle.toml) into an unsigned bundle file.
    Pack {
        /// Directory with bundle.toml and the model files.
        model_dir: PathBuf,
        /// Bundle file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Add signatures to a bundle file in place.
    Sign {
        /// Bundle file.
        file: PathBuf,
        /// Secret key file; repeat for several signatures.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Verify a bundle: exit 0 with a summary when valid, exit 1 with the reason when not.
    Verify {
        /// Bundle file.
        file: PathBuf,
        /// Trusted public key file; repeat for several.
        #[arg(long = "trust", required = true)]
        trust: Vec<PathBuf>,
        /// Distinct trusted keys that must have signed.
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        /// Refuse bundles whose sequence number is not above this.
        #[arg(long)]
        min_seq: Option<u64>,
        /// Also check the bundle's requirements against this host.
        #[arg(long)]
        check_host: bool,
    },
    /// Show what a bundle holds (signatures not checked).
    Inspect {
        /// Bundle file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Upload a signed bundle file to a control plane, which verifies it against its trusted
    /// publisher keys.
    Push {
        /// Bundle file.
        file: PathBuf,
        /// Print the API's JSON instead of a summary.
        #[arg(long)]
        json: bool,
        /// Server and token.
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// List the bundles a control plane holds, newest first.
    List {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Server and token.
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

/// `flotilla keyset ...`.
#[derive(Debug, Subcommand)]
pub enum KeysetCommand {
    /// Write an unsigned key set: the publisher keys trusted from VERSION on.
    New {
        /// Its version: one above the key set trusted now (`flotilla keyset status`); the
        /// keys agents are configured with are key set 1 unless their trust.key_set says
        /// otherwise.
        #[arg(long)]
        version: u64,
        /// Public key file of a publisher it trusts; repeat for several.
        #[arg(long = "publisher", required = true)]
        publishers: Vec<PathBuf>,
        /// Distinct publisher signatures a bundle needs.
        #[arg(long, default_value_t = 1)]
        threshold: u32,
        /// Public key file of a new control-plane key (`flotilla server new-key`): agents
        /// require it on desired states from this set on.
        #[arg(long, value_name = "PUB")]
        control_plane: Option<PathBuf>,
        /// MODEL=SEQ: every agent's sequence floor for MODEL becomes SEQ, to recover from a
        /// release numbered too high by a key this set retires; repeat for several models.
        #[arg(long = "reset-floor", value_name = "MODEL=SEQ", value_parser = keyset::parse_floor)]
        reset_floors: Vec<(String, u64)>,
        /// File to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Add signatures to a key set file in place. It needs a threshold of the keys trusted now
    /// and a threshold of its own keys.
    Sign {
        /// Key set file.
        file: PathBuf,
        /// Secret key file; repeat for several signatures.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Show what a key set file holds and which keys signed it (signatures not checked).
    Show {
        /// Key set file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Push a signed key set to a control plane (admin), which sends it to every agent with
    /// its desired state. Refused while agents serve, or active rollouts ship, bundles its
    /// keys did not sign, unless --force.
    Push {
        /// Key set file.
        file: PathBuf,
        /// Accept it even though agents serve, or active rollouts ship, bundles its keys did
        /// not sign: they keep serving them but cannot load them again after a restart.
        #[arg(long)]
        force: bool,
        /// Print the API's JSON instead of a summary.
        #[arg(long)]
        json: bool,
        /// Server and token.
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// The key set a control plane trusts, every key set it keeps, and agents on an older one.
    Status {
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Server and token.
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

/// `flotilla rollout ...`.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a rollout from a spec file (`--spec`) or from flags.
    Start(Box<StartArgs>),
    /// List rollouts, newest first.
    List {
        /// Only rollouts that still hold their agents (pending, running, paused, rolling
        /// back).
        #[arg(long)]
        active: bool,
        /// At most this many, the newest.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Only those older than this rollout (the last of the previous page).
        #[arg(long, value_name = "ID")]
        before: Option<String>,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Server and token.
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Show one rollout: waves with agents by phase, gate values, new versus previous
    /// metrics, and the failure if any.
    Status {
        /// Rollout id.
        id: String,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Server and token.
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Stop before the next step until resumed or rolled back.
    Pause(SteerArgs),
    /// Carry on after a pause (past a failed gate, when that paused it).
    Resume(SteerArgs),
    /// Stop where it is: no further waves, nothing reverted.
    Abort(SteerArgs),
    /// Return every agent that received the new version to what it ran before.
    Rollback(SteerArgs),
}

/// The rollout an operator action applies to, and why.
#[derive(Debug, Args)]
pub struct SteerArgs {
    /// Rollout id.
    pub id: String,
    /// Why, for the event log [default: operator request].
    #[arg(long)]
    pub reason: Option<String>,
    /// Print the API's JSON for the rollout afterwards.
    #[arg(long)]
    pub json: bool,
    /// Server and token.
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// `flotilla events` filters.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only events about this agent.
    #[arg(long)]
    pub agent: Option<String>,
    /// Only events of this rollout.
    #[arg(long)]
    pub rollout: Option<String>,
    /// Only events of this kind, e.g. `bundle_uploaded`.
    #[arg(long)]
    pub kind: Option<String>,
    /// Only events with a larger id.
    #[arg(long, value_name = "N")]
    pub after: Option<u64>,
    /// At most this many events (1-1000) [default: 100].
    #[arg(long, value_name = "N", conflicts_with = "follow")]
    pub limit: Option<usize>,
    /// Print every event from `--after` (the start of the log by default) on as the server
    /// logs it, from its event stream, until interrupted.
    #[arg(long, short)]
    pub follow: bool,
    /// Print the API's JSON (JSON lines with --follow).
    #[arg(long)]
    pub json: bool,
    /// Server and token.
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { name, dir } => bundle::keygen(&name, &dir),
        Command::Bundle(BundleCommand::Pack { model_dir, out }) => bundle::pack(&model_dir, &out),
        Command::Bundle(BundleCommand::Sign { file, keys }) => bundle::sign(&file, &keys),
        Command::Bundle(BundleCommand::Verify {
            file,
            trust,
            threshold,
            min_seq,
            check_host,
        }) => bundle::verify(&bundle::VerifyArgs {
            file,
            trust,
            threshold,
            min_seq,
            check_host,
        }),
        Command::Bundle(BundleCommand::Inspect { file, json }) => bundle::inspect(&file, json),
        Command::Bundle(BundleCommand::Push { file, json, remote }) => {
            remote::bundles::push(&file, &remote, json)
        }
        Command::Bundle(BundleCommand::List { json, remote }) => {
            remote::bundles::list(&remote, json)
        }
        Command::Rollout(command) => run_rollout(command),
        Command::Keyset(command) => run_keyset(command),
        Command::Agents {
            command: Some(AgentsCommand::Forget { id, remote }),
            ..
        } => remote::fleet::forget(&id, &remote),
        Command::Agents {
            command: Some(AgentsCommand::Pending { json, remote }),
            ..
        } => remote::fleet::pending(&remote, json),
        Command::Agents {
            command: Some(AgentsCommand::Accept { id, key, remote }),
            ..
        } => remote::fleet::accept(&id, &key, &remote),
        Command::Agents {
            command: Some(AgentsCommand::Approved { json, remote }),
            ..
        } => remote::fleet::approved(&remote, json),
        Command::Agents {
            command: None,
            selector,
            online,
            offline,
            page_size,
            json,
            remote,
        } => {
            let filter = remote::fleet::AgentFilter {
                selector,
                online: (online || offline).then_some(online),
                page_size: page_size.into(),
            };
            remote::fleet::agents(&filter, &remote, json)
        }
        Command::Events(args) => {
            let filter = remote::fleet::EventFilter {
                agent: args.agent,
                rollout: args.rollout,
                kind: args.kind,
                after: args.after,
                limit: args.limit,
            };
            remote::fleet::events(&filter, args.follow, &args.remote, args.json)
        }
        Command::Backup { out, remote } => remote::backup::download(&out, &remote),
        Command::Demo(args) => demo::run(&args),
        Command::Server {
            command: Some(ServerCommand::Token { name, role }),
            ..
        } => server::token(&name, role),
        Command::Server {
            command: Some(ServerCommand::NewKey { data_dir }),
            ..
        } => server::new_key(&data_dir),
        Command::Server {
            command:
                Some(ServerCommand::Restore {
                    file,
                    data_dir,
                    check,
                }),
            ..
        } => match data_dir {
            Some(data_dir) if !check => server::restore(&file, &data_dir),
            _ => server::check_backup(&file),
        },
        Command::Server {
            command: None,
            args,
        } => server::run(&args),
    }
}

fn run_keyset(command: KeysetCommand) -> Result<()> {
    match command {
        KeysetCommand::New {
            version,
            publishers,
            threshold,
            control_plane,
            reset_floors,
            out,
        } => keyset::new(&keyset::NewArgs {
            version,
            publishers,
            threshold,
            control_plane,
            reset_floors,
            out,
        }),
        KeysetCommand::Sign { file, keys } => keyset::sign(&file, &keys),
        KeysetCommand::Show { file, json } => keyset::show(&file, json),
        KeysetCommand::Push {
            file,
            force,
            json,
            remote,
        } => remote::trust::push(&file, force, &remote, json),
        KeysetCommand::Status { json, remote } => remote::trust::status(&remote, json),
    }
}

fn run_rollout(command: RolloutCommand) -> Result<()> {
    use remote::rollouts::{self, Steer};
    let (steer, args) = match command {
        RolloutCommand::Start(args) => return rollouts::start(&args),
        RolloutCommand::List {
            active,
            limit,
            before,
            json,
            remote,
        } => return rollouts::list(active, limit, before, &remote, json),
        RolloutCommand::Status { id, json, remote } => return rollouts::status(&id, &remote, json),
        RolloutCommand::Pause(args) => (Steer::Pause, args),
        RolloutCommand::Resume(args) => (Steer::Resume, args),
        RolloutCommand::Abort(args) => (Steer::Abort, args),
        RolloutCommand::Rollback(args) => (Steer::Rollback, args),
    };
    rollouts::steer(
        &args.id,
        steer,
        args.reason.as_deref(),
        &args.remote,
        args.json,
    )
}
