//! Staged rollouts: a pure engine that moves one bundle across a fleet in gated waves.
//!
//! **Invariant: no IO, no clock, no async.** The server feeds a [`Rollout`] what agents report
//! ([`Rollout::on_presence`], [`Rollout::on_event`], [`Rollout::on_heartbeat`]), the passing
//! of time ([`Rollout::tick`]) and operator actions, each with the current Unix time in
//! milliseconds, and carries out the [`Action`]s it returns. Because the whole rollout
//! serialises, the server persists it after every call and a restart resumes exactly.
//!
//! - [`RolloutSpec`]: what an operator asks for, in JSON or TOML, validated.
//! - [`Selector`]: Kubernetes-style label selectors choosing the targets.
//! - cohorts: targets ordered by SHA-256 of (rollout id, agent id), optionally stratified by
//!   a label so every wave samples every label value.
//! - gates: install and self-test failures, agents dropping offline, the new version's error
//!   rate and p99 (absolute and against the previous version on the same agents), and the
//!   fraction of reachable agents that reported. Offline agents stay out of denominators.
//! - on failure: every agent that received the new version is sent back to the version it
//!   ran before, or the rollout pauses for an operator.
//!
//! What the server does around the engine:
//!
//! 1. Resolve the spec's bundle reference to a [`DesiredBundle`], gather [`Target`]s from
//!    its agent registry, build the rollout with [`Rollout::new`], refuse it with
//!    [`check_overlap`] if an active rollout holds any of its agents, then persist it.
//! 2. Route each agent's presence (stale wills dropped), events and heartbeats to the active
//!    rollout that targets it, and call [`Rollout::tick`] at [`Rollout::next_deadline_ms`] or
//!    on a steady interval.
//! 3. Turn every [`Action::SetDesired`] into a signed, retained desired state with the next
//!    generation for that agent and the rollout id; log and record every [`Action::Log`].
//! 4. Persist the whole rollout after every call (CBOR keeps every floating-point figure
//!    bit-exact), and build API views from the accessors rather than the persisted form, which
//!    also holds per-agent metric baselines.
//!
//! [`DesiredBundle`]: flotilla_shared::wire::DesiredBundle

mod cohort;
mod gates;
mod machine;
mod metrics;
mod selector;
mod spec;

#[cfg(test)]
mod tests;

pub use cohort::{assign as assign_cohorts, order_key, wave_sizes, Candidate};
pub use gates::{GateName, GateValue};
pub use machine::{
    check_overlap, Action, AgentPhase, AgentStatus, GateFailure, InstallProgress, RollbackCause,
    Rollout, RolloutError, RolloutEvent, RolloutState, Target, WaveOutcome, WaveStage, WaveStatus,
};
pub use metrics::{Comparison, VersionSummary, Window};
pub use selector::{
    check_label_key, check_label_value, Operator, Requirement, Selector, SelectorError,
};
pub use spec::{
    BundleRef, Gates, OnFailure, RolloutSpec, SpecError, Threshold, WaveSize, WaveSpec,
    DEFAULT_INSTALL_TIMEOUT_SECS, DEFAULT_MAX_INSTALL_FAILURES, DEFAULT_MAX_SELF_TEST_FAILURES,
    DEFAULT_MIN_REPORTING,
};
