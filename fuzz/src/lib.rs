//! Shared pieces of Flotilla's fuzz targets: fixtures, the signed-mutation harness, the oracle.
//!
//! The targets themselves live in `fuzz_targets/` and stay thin; what they have in common is
//! here so the seed generator (`src/bin/seeds.rs`) builds its corpus from the same fixtures the
//! targets verify against, and so `cargo test` can check the harness without libFuzzer.

pub mod fixtures;
pub mod mutation;
pub mod oracle;
pub mod structured;
