//! Flotilla control plane library: operator commands around bundles and keys.
//!
//! [`keyfile`] reads and writes key files, [`pack`] turns a model directory into a bundle, and
//! [`cli`] holds the operator commands the `flotilla` binary dispatches to.

pub mod cli;
pub mod distribution;
pub mod keyfile;
pub mod pack;
pub mod rollout;
