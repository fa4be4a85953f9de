//! Flotilla's shared vocabulary: the bundle format, signatures, tensors and MQTT wire types.
//!
//! This crate does no IO and owns no clock: callers hand it bytes and the current time, and it
//! answers with decoded values or a specific error. Both the agent and the control plane build on
//! it, so anything that crosses a process boundary is defined here exactly once.

pub mod bundle;
pub mod digest;
pub mod keys;
pub mod keyset;
pub mod manifest;
pub mod tensor;
pub mod verify;
pub mod wire;

pub use bundle::{Bundle, BundleBuilder, BundleError};
pub use digest::Sha256Digest;
pub use keys::{KeyError, KeyId, PublicKey, SecretKey};
pub use keyset::{KeySet, KeySetError, SignedKeySet, TrustedKeys};
pub use manifest::Manifest;
pub use verify::{HostProfile, VerifiedBundle, Verifier, VerifyError};
