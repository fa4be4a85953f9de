//! Flotilla edge agent: follows the control plane's desired state, installs verified bundles,
//! and serves the active model to local applications.
//!
//! [`runtime`] loads a bundle's ONNX model on a backend and serves tensors or text through it.
//! It is a library so the operator CLI can compute self-test expectations with the very code an
//! agent uses to check them.

pub mod agent;
pub mod api;
pub mod config;
pub mod download;
pub mod host;
pub mod identity;
pub mod install;
pub mod keyfile;
pub mod link;
pub mod metrics;
pub mod outbox;
pub mod runtime;
pub mod serving;
pub mod store;

/// This agent's version, compared against bundles' minimum agent version.
pub fn agent_version() -> semver::Version {
    semver::Version::parse(env!("CARGO_PKG_VERSION")).expect("invariant: Cargo versions are semver")
}
