//! `flotilla`: the control-plane server and the operator CLI in one binary.

use clap::Parser;
use flotilla_control_plane::cli::{self, Cli};

fn main() {
    let cli = Cli::parse();
    if let Err(e) = cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
