//! Flotilla control plane: the operator CLI and the fleet server.
//!
//! [`keyfile`] (the agent's, re-exported) reads and writes key files, [`pack`] turns a model
//! directory into a bundle, [`distribution`] answers chunk requests so concurrent downloaders
//! share what is sent, [`rollout`] is the pure staged-rollout engine, [`server`] is
//! `flotilla server`, and [`cli`] holds the commands the `flotilla` binary dispatches to.

pub mod cli;
pub mod distribution;
pub use flotilla_agent::keyfile;
pub mod pack;
pub mod rollout;
pub mod server;
