//! Flotilla edge agent: the inference runtime every Flotilla component shares.
//!
//! [`runtime`] loads a bundle's ONNX model on a backend and serves tensors or text through it.
//! It is a library so the operator CLI can compute self-test expectations with the very code an
//! agent uses to check them.

pub mod runtime;

/// This agent's version, compared against bundles' minimum agent version.
pub fn agent_version() -> semver::Version {
    semver::Version::parse(env!("CARGO_PKG_VERSION")).expect("invariant: Cargo versions are semver")
}
