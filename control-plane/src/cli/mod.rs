//! The `flotilla` command line: argument definitions and dispatch.

mod bundle;
mod server;

pub use server::ServeArgs;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    /// Run the control plane (embedded MQTT broker unless --broker), or make API tokens.
    Server {
        /// `token` to make an API token; nothing to run the server.
        #[command(subcommand)]
        command: Option<ServerCommand>,
        /// Flags for running the server.
        #[command(flatten)]
        args: ServeArgs,
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
        Command::Server {
            command: Some(ServerCommand::Token { name, role }),
            ..
        } => server::token(&name, role),
        Command::Server {
            command: None,
            args,
        } => server::run(&args),
    }
}
