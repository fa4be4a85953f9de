//! The rollout state machine: agent reports and operator actions in, desired states out.
//!
//! A [`Rollout`] owns everything it knows (the plan, every agent's progress, every gate
//! evaluation) and serialises whole, so the server can persist it after each call and a
//! restarted server resumes exactly where it stopped. Every input takes the current time in
//! Unix milliseconds and nothing reads a clock, so the same inputs always give the same
//! [`Action`]s.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_shared::wire::{ActiveModel, DesiredBundle, Event, EventKind, Heartbeat};
use serde::{Deserialize, Serialize};

use super::cohort::{self, Candidate};
use super::gates::{self, GateName, GateValue, Tally};
use super::metrics::{AgentMetrics, Comparison, Window};
use super::spec::{OnFailure, RolloutSpec, SpecError};

/// Agent stage reported when an install fails in the self-test; counted as a self-test failure.
const SELF_TEST_STAGE: &str = "self_test";

/// Longest rollout id.
const MAX_ID_LEN: usize = 64;

/// How many agent ids an overlap error spells out before it only counts.
const OVERLAP_NAMES_SHOWN: usize = 10;

/// One agent the server knows when it creates a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Agent id.
    pub agent: String,
    /// Its labels, from its latest birth message.
    pub labels: BTreeMap<String, String>,
    /// Whether it is connected now.
    pub online: bool,
    /// The bundle it serves now, if any; what a rollback returns it to unless later
    /// heartbeats report something else before its wave starts.
    pub running: Option<DesiredBundle>,
}

/// What the server must do after a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish a signed, retained desired state for `agent` naming `bundle` (with this
    /// rollout's id). `None` means "keep whatever runs": it is what a rollback sends to an
    /// agent that ran no model before, so the retained state stops naming the new bundle.
    SetDesired {
        /// Agent id.
        agent: String,
        /// The bundle to run.
        bundle: Option<DesiredBundle>,
    },
    /// Record and log a lifecycle event.
    Log(RolloutEvent),
}

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RolloutState {
    /// Created, not started.
    Pending,
    /// Wave `index` is under way.
    Wave {
        /// Wave index, from 0.
        index: usize,
        /// Installing or baking.
        stage: WaveStage,
    },
    /// Stopped before the next step until an operator resumes or rolls back.
    Paused {
        /// The wave it stopped in.
        index: usize,
        /// Where that wave was.
        stage: WaveStage,
        /// When it paused, Unix milliseconds.
        since_ms: u64,
        /// Why, in words.
        reason: String,
        /// The gate that failed, when a failure paused it rather than an operator.
        failure: Option<GateFailure>,
    },
    /// Every wave passed.
    Completed {
        /// When, Unix milliseconds.
        at_ms: u64,
    },
    /// Stopped where it was: no further waves, nothing reverted.
    Aborted {
        /// When, Unix milliseconds.
        at_ms: u64,
        /// Why, in words.
        reason: String,
        /// The wave under way when it stopped, if one was.
        index: Option<usize>,
    },
    /// Waiting for reverted agents to report their old version.
    RollingBack {
        /// When the rollback began, Unix milliseconds.
        since_ms: u64,
        /// When waiting ends regardless, Unix milliseconds.
        until_ms: u64,
        /// What triggered it.
        cause: RollbackCause,
    },
    /// The rollback is over; agents that did not confirm are
    /// [`AgentPhase::RollbackStalled`].
    RolledBack {
        /// When, Unix milliseconds.
        at_ms: u64,
        /// What triggered it.
        cause: RollbackCause,
    },
}

impl RolloutState {
    /// The state's name, as in the JSON form.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Wave { .. } => "wave",
            Self::Paused { .. } => "paused",
            Self::Completed { .. } => "completed",
            Self::Aborted { .. } => "aborted",
            Self::RollingBack { .. } => "rolling_back",
            Self::RolledBack { .. } => "rolled_back",
        }
    }
}

/// The two halves of a wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveStage {
    /// Agents are fetching and installing; ends when every reachable agent installed or
    /// failed, or at the install timeout.
    Installing,
    /// Agents serve the new version while the gates watch.
    Baking,
}

/// Why a rollback happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum RollbackCause {
    /// A wave failed a gate.
    Gate(GateFailure),
    /// An operator asked for it.
    Operator {
        /// Why, in words.
        reason: String,
    },
}

/// A failed gate with its numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateFailure {
    /// Wave index, from 0.
    pub wave: usize,
    /// When it was decided, Unix milliseconds.
    pub at_ms: u64,
    /// Which gate.
    pub gate: GateName,
    /// What was measured; see [`GateValue::value`].
    pub value: Option<f64>,
    /// The limit it broke.
    pub threshold: f64,
    /// What the value is taken over; see [`GateValue::basis`].
    pub basis: u64,
}

/// What one wave is and how it went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveStatus {
    /// Wave index, from 0.
    pub index: usize,
    /// The agents the plan put in this wave.
    pub cohort: Vec<String>,
    /// Agents of earlier waves that were offline then and joined this wave on their return.
    pub joined: Vec<String>,
    /// Bake time from the spec, seconds.
    pub bake_secs: u64,
    /// When the wave started, Unix milliseconds.
    pub started_ms: Option<u64>,
    /// When the install stage ends regardless.
    pub install_deadline_ms: Option<u64>,
    /// When the bake started.
    pub bake_started_ms: Option<u64>,
    /// When the bake ends and the gates decide.
    pub bake_ends_ms: Option<u64>,
    /// When the wave fails if too few agents have reported.
    pub deadline_ms: Option<u64>,
    /// The latest gate evaluation.
    pub gates: Vec<GateValue>,
    /// How it ended, once it has.
    pub outcome: Option<WaveOutcome>,
}

/// How a wave ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum WaveOutcome {
    /// Every gate held.
    Passed {
        /// When, Unix milliseconds.
        at_ms: u64,
    },
    /// A gate failed.
    Failed(GateFailure),
    /// A gate failed, the rollout paused, and an operator resumed past the failure.
    Overridden {
        /// When the operator resumed, Unix milliseconds.
        at_ms: u64,
        /// The failure resumed past.
        failure: GateFailure,
    },
}

/// One agent's part in a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The wave it belongs to (it moves to a later wave if it missed its own).
    pub wave: usize,
    /// Its value of the stratification label, when the rollout stratifies.
    pub stratum: Option<String>,
    /// Whether it is connected, as far as the rollout was told.
    pub online: bool,
    /// Where it is.
    pub phase: AgentPhase,
    /// What it ran before receiving the new version: the rollback target. `None` means it
    /// ran no model; a rollback can then only stop naming the new bundle, since the wire
    /// protocol has no "unload" desired state.
    pub previous: Option<DesiredBundle>,
    /// When the new version was last sent to it; `Some` once it has received the new
    /// version, which makes it a rollback target.
    pub assigned_ms: Option<u64>,
    /// When it first sent a heartbeat while serving the new version.
    pub reported_ms: Option<u64>,
    /// Whether it went offline during its wave after receiving the new version.
    pub dropped: bool,
    pub(crate) metrics: AgentMetrics,
}

impl AgentStatus {
    /// Whether it was sent the new version and has not reached an outcome yet.
    fn awaits_install(&self) -> bool {
        let in_progress = matches!(
            self.phase,
            AgentPhase::Assigned { .. }
                | AgentPhase::Installing { .. }
                | AgentPhase::Unreachable { .. }
        );
        self.assigned_ms.is_some() && in_progress
    }
}

/// Where one agent is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum AgentPhase {
    /// Its wave has not started.
    Waiting,
    /// Offline since its wave started or since it dropped mid-wave, with no outcome yet; it
    /// gets the new version when it returns while the rollout runs.
    Unreachable {
        /// Since when, Unix milliseconds.
        since_ms: u64,
    },
    /// The new version was sent; nothing heard yet.
    Assigned {
        /// When, Unix milliseconds.
        at_ms: u64,
    },
    /// Installing.
    Installing {
        /// The latest step it reported.
        progress: InstallProgress,
        /// When it reported it, Unix milliseconds.
        at_ms: u64,
    },
    /// Serving the new version.
    Active {
        /// Since when, Unix milliseconds.
        at_ms: u64,
    },
    /// The install failed, or the agent stopped serving the new version after activating it.
    Failed {
        /// The step that failed (`download`, `verify`, `stage`, `activate`, `desired_state`).
        stage: String,
        /// Why.
        reason: String,
        /// When, Unix milliseconds.
        at_ms: u64,
    },
    /// A self-test failed; the agent kept its previous model.
    SelfTestFailed {
        /// Which test and by how much.
        reason: String,
        /// When, Unix milliseconds.
        at_ms: u64,
    },
    /// Sent back to its previous version; not confirmed yet.
    RollingBack {
        /// Since when, Unix milliseconds.
        since_ms: u64,
    },
    /// Confirmed on its previous version (or it had none to return to).
    RolledBack {
        /// When, Unix milliseconds.
        at_ms: u64,
    },
    /// Did not confirm its previous version before the rollback timeout; its retained desired
    /// state still names that version, so it reverts when it next connects.
    RollbackStalled {
        /// Since when it was sent back, Unix milliseconds.
        since_ms: u64,
    },
}

impl AgentPhase {
    /// Whether the agent reached an install outcome in its wave.
    pub fn has_outcome(&self) -> bool {
        matches!(
            self,
            Self::Active { .. } | Self::Failed { .. } | Self::SelfTestFailed { .. }
        )
    }
}

/// The latest install step an agent reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum InstallProgress {
    /// Chunks arriving.
    Downloading {
        /// Chunks held.
        received: u32,
        /// Chunks in the bundle.
        total: u32,
    },
    /// Verifying the whole bundle.
    Verifying,
    /// Loaded beside the active model.
    Staged,
    /// Self-tests passed; activation next.
    SelfTestPassed,
}

/// Lifecycle events, for the server to log and record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RolloutEvent {
    /// The first wave started.
    Started {
        /// Unix milliseconds.
        at_ms: u64,
        /// Agents in the rollout.
        targets: usize,
        /// Waves planned.
        waves: usize,
    },
    /// A wave started.
    WaveStarted {
        /// Unix milliseconds.
        at_ms: u64,
        /// Wave index.
        wave: usize,
        /// Agents sent the new version.
        assigned: usize,
        /// Agents offline, to be sent it when they return.
        unreachable: usize,
    },
    /// An agent that was offline came back and was sent the new version.
    AgentReturned {
        /// Unix milliseconds.
        at_ms: u64,
        /// Agent id.
        agent: String,
        /// The wave it now counts in.
        wave: usize,
    },
    /// An agent's install or self-test failed.
    AgentFailed {
        /// Unix milliseconds.
        at_ms: u64,
        /// Agent id.
        agent: String,
        /// Its wave.
        wave: usize,
        /// The failed step.
        stage: String,
        /// Why.
        reason: String,
    },
    /// A wave's bake started.
    BakeStarted {
        /// Unix milliseconds.
        at_ms: u64,
        /// Wave index.
        wave: usize,
        /// When the gates decide, Unix milliseconds.
        until_ms: u64,
    },
    /// The gates decided a wave.
    GatesEvaluated {
        /// Unix milliseconds.
        at_ms: u64,
        /// Wave index.
        wave: usize,
        /// Every gate's numbers.
        gates: Vec<GateValue>,
        /// Whether the wave passed.
        passed: bool,
    },
    /// A wave passed.
    WavePassed {
        /// Unix milliseconds.
        at_ms: u64,
        /// Wave index.
        wave: usize,
    },
    /// A wave failed a gate.
    GateFailed(GateFailure),
    /// The rollout paused.
    Paused {
        /// Unix milliseconds.
        at_ms: u64,
        /// Wave index.
        wave: usize,
        /// Why.
        reason: String,
    },
    /// The rollout resumed.
    Resumed {
        /// Unix milliseconds.
        at_ms: u64,
        /// The wave it stopped in.
        wave: usize,
        /// Whether the operator resumed past a failed gate.
        overridden: bool,
    },
    /// Every wave passed.
    Completed {
        /// Unix milliseconds.
        at_ms: u64,
        /// Offline agents sent the new version to pick up when they return.
        stragglers: usize,
    },
    /// The rollout was aborted.
    Aborted {
        /// Unix milliseconds.
        at_ms: u64,
        /// Why.
        reason: String,
    },
    /// Agents that received the new version were sent back.
    RollbackStarted {
        /// Unix milliseconds.
        at_ms: u64,
        /// Agents sent back.
        agents: usize,
        /// Why.
        cause: RollbackCause,
    },
    /// The rollback finished.
    RolledBack {
        /// Unix milliseconds.
        at_ms: u64,
        /// Agents confirmed on their previous version.
        confirmed: usize,
        /// Agents that did not confirm in time.
        stragglers: Vec<String>,
    },
}

/// Why a rollout could not be created or an operator action was refused.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The rollout id is malformed.
    #[error("create rollout {rollout:?}: id must be 1-{MAX_ID_LEN} characters of [A-Za-z0-9._-]")]
    CheckId {
        /// The id as given.
        rollout: String,
    },
    /// The spec is invalid.
    #[error("create rollout {rollout}: {source}")]
    CheckSpec {
        /// Rollout id.
        rollout: String,
        /// What is wrong with the spec.
        #[source]
        source: SpecError,
    },
    /// The server resolved the spec's bundle to a different bundle.
    #[error("create rollout {rollout}: spec names {requested} but the bundle given is {resolved}")]
    ResolveBundle {
        /// Rollout id.
        rollout: String,
        /// The spec's reference.
        requested: String,
        /// The resolved bundle as `name@version (digest)`.
        resolved: String,
    },
    /// No agent needs the bundle.
    #[error(
        "create rollout {rollout}: selector {selector:?} matches no agent that needs the bundle \
         ({already_running} already run it)"
    )]
    SelectTargets {
        /// Rollout id.
        rollout: String,
        /// The selector, canonical form.
        selector: String,
        /// Matching agents already on the bundle.
        already_running: usize,
    },
    /// `start` on a rollout that is not pending.
    #[error("start rollout {rollout}: it is {state}, not pending")]
    Start {
        /// Rollout id.
        rollout: String,
        /// Its state.
        state: &'static str,
    },
    /// `pause` outside a running wave.
    #[error("pause rollout {rollout}: it is {state}, not running a wave")]
    Pause {
        /// Rollout id.
        rollout: String,
        /// Its state.
        state: &'static str,
    },
    /// `resume` on a rollout that is not paused.
    #[error("resume rollout {rollout}: it is {state}, not paused")]
    Resume {
        /// Rollout id.
        rollout: String,
        /// Its state.
        state: &'static str,
    },
    /// `abort` on a rollout that already ended.
    #[error("abort rollout {rollout}: it already ended ({state})")]
    Abort {
        /// Rollout id.
        rollout: String,
        /// Its state.
        state: &'static str,
    },
    /// `rollback` on a rollout that has nothing to revert or is already reverting.
    #[error("roll back rollout {rollout}: it is {state}")]
    Rollback {
        /// Rollout id.
        rollout: String,
        /// Its state.
        state: &'static str,
    },
    /// A new rollout would take agents an active rollout holds.
    #[error("check overlap: rollout {rollout} is active on {}", name_agents(.agents))]
    CheckOverlap {
        /// The active rollout.
        rollout: String,
        /// The agents both would target.
        agents: Vec<String>,
    },
}

fn name_agents(agents: &[String]) -> String {
    let shown = agents[..agents.len().min(OVERLAP_NAMES_SHOWN)].join(", ");
    match agents.len().checked_sub(OVERLAP_NAMES_SHOWN) {
        Some(more) if more > 0 => format!("{shown} and {more} more"),
        _ => shown,
    }
}

/// A staged rollout of one bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    id: String,
    spec: RolloutSpec,
    bundle: DesiredBundle,
    created_ms: u64,
    state: RolloutState,
    waves: Vec<WaveStatus>,
    agents: BTreeMap<String, AgentStatus>,
    skipped: Vec<String>,
}

impl Rollout {
    /// Plans a rollout of `bundle` (the server's resolution of `spec.bundle`) over the agents
    /// of `fleet` the selector matches. Agents already running the bundle are left out (see
    /// [`Rollout::skipped`]); an agent listed twice counts once, as its last entry says.
    pub fn new(
        id: impl Into<String>,
        spec: RolloutSpec,
        bundle: DesiredBundle,
        fleet: &[Target],
        now_ms: u64,
    ) -> Result<Self, RolloutError> {
        let id = id.into();
        check_rollout_id(&id)?;
        spec.validate().map_err(|source| RolloutError::CheckSpec {
            rollout: id.clone(),
            source,
        })?;
        if !spec
            .bundle
            .names(&bundle.digest, &bundle.name, &bundle.version)
        {
            return Err(RolloutError::ResolveBundle {
                rollout: id,
                requested: spec.bundle.to_string(),
                resolved: format!("{}@{} ({})", bundle.name, bundle.version, bundle.digest),
            });
        }

        let unique: BTreeMap<&str, &Target> = fleet.iter().map(|t| (t.agent.as_str(), t)).collect();
        let mut skipped = Vec::new();
        let mut chosen = Vec::new();
        for (agent, target) in unique {
            if !spec.selector.matches(&target.labels) {
                continue;
            }
            let already_running = target
                .running
                .as_ref()
                .is_some_and(|b| b.digest == bundle.digest);
            if already_running {
                skipped.push(agent.to_owned());
                continue;
            }
            chosen.push(target);
        }
        if chosen.is_empty() {
            return Err(RolloutError::SelectTargets {
                rollout: id,
                selector: spec.selector.to_string(),
                already_running: skipped.len(),
            });
        }

        let stratify_by = spec.stratify_by.as_deref();
        let candidates: Vec<Candidate<'_>> = chosen
            .iter()
            .map(|t| Candidate {
                agent: &t.agent,
                stratum: stratum_of(t, stratify_by),
            })
            .collect();
        let cohorts = cohort::assign(&id, &candidates, &spec.waves);

        let by_id: BTreeMap<&str, &Target> =
            chosen.iter().map(|t| (t.agent.as_str(), *t)).collect();
        let mut agents = BTreeMap::new();
        let mut waves = Vec::with_capacity(cohorts.len());
        for (index, cohort) in cohorts.into_iter().enumerate() {
            for agent in &cohort {
                let target = by_id[agent.as_str()];
                agents.insert(
                    agent.clone(),
                    AgentStatus {
                        wave: index,
                        stratum: stratum_of(target, stratify_by).map(str::to_owned),
                        online: target.online,
                        phase: AgentPhase::Waiting,
                        previous: target.running.clone(),
                        assigned_ms: None,
                        reported_ms: None,
                        dropped: false,
                        metrics: AgentMetrics::default(),
                    },
                );
            }
            waves.push(WaveStatus {
                index,
                cohort,
                joined: Vec::new(),
                bake_secs: spec.waves[index].bake_secs,
                started_ms: None,
                install_deadline_ms: None,
                bake_started_ms: None,
                bake_ends_ms: None,
                deadline_ms: None,
                gates: Vec::new(),
                outcome: None,
            });
        }

        Ok(Self {
            id,
            spec,
            bundle,
            created_ms: now_ms,
            state: RolloutState::Pending,
            waves,
            agents,
            skipped,
        })
    }

    /// Rollout id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The spec it was created from.
    pub fn spec(&self) -> &RolloutSpec {
        &self.spec
    }

    /// The bundle it rolls out.
    pub fn bundle(&self) -> &DesiredBundle {
        &self.bundle
    }

    /// When it was created, Unix milliseconds.
    pub fn created_ms(&self) -> u64 {
        self.created_ms
    }

    /// Where it stands.
    pub fn state(&self) -> &RolloutState {
        &self.state
    }

    /// The planned waves (fewer than the spec lists when the targets ran out early).
    pub fn waves(&self) -> &[WaveStatus] {
        &self.waves
    }

    /// One agent's part, if it takes part.
    pub fn agent(&self, agent: &str) -> Option<&AgentStatus> {
        self.agents.get(agent)
    }

    /// Every agent taking part, by id.
    pub fn agents(&self) -> impl Iterator<Item = (&str, &AgentStatus)> {
        self.agents.iter().map(|(id, a)| (id.as_str(), a))
    }

    /// Ids of every agent taking part.
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.agents.keys().map(String::as_str)
    }

    /// Agents the selector matched that already ran the bundle.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// Whether the rollout still holds its agents (pending, running, paused or rolling
    /// back); another rollout must not target them meanwhile.
    pub fn is_active(&self) -> bool {
        matches!(
            self.state,
            RolloutState::Pending
                | RolloutState::Wave { .. }
                | RolloutState::Paused { .. }
                | RolloutState::RollingBack { .. }
        )
    }

    /// The latest gate evaluation of wave `wave`; empty before the wave started.
    pub fn gate_values(&self, wave: usize) -> &[GateValue] {
        self.waves.get(wave).map_or(&[], |w| w.gates.as_slice())
    }

    /// The first gate failure, if a wave failed one (including one an operator resumed past).
    pub fn failure(&self) -> Option<&GateFailure> {
        self.waves.iter().find_map(|w| match &w.outcome {
            Some(WaveOutcome::Failed(failure) | WaveOutcome::Overridden { failure, .. }) => {
                Some(failure)
            }
            _ => None,
        })
    }

    /// Agents that did not confirm their previous version before the rollback timeout.
    pub fn stragglers(&self) -> impl Iterator<Item = &str> {
        self.agents
            .iter()
            .filter(|(_, a)| matches!(a.phase, AgentPhase::RollbackStalled { .. }))
            .map(|(id, _)| id.as_str())
    }

    /// The new version next to the previous one over wave `wave`'s agents, live: the new
    /// version's figures run from each agent's activation to its latest heartbeat (kept for
    /// agents that have since failed or been rolled back), the previous version's are its
    /// last report on those same agents.
    pub fn comparison(&self, wave: usize) -> Option<Comparison> {
        self.waves.get(wave)?;
        let mut new = Window::default();
        let mut previous = Window::default();
        let (mut new_agents, mut paired_agents) = (0, 0);
        for status in self.members(wave) {
            let served_new = status.metrics.new.latency.is_some();
            if !served_new {
                continue;
            }
            new.add(&status.metrics.new);
            new_agents += 1;
            if let Some(before) = &status.metrics.previous {
                previous.add(before);
                paired_agents += 1;
            }
        }
        Some(Comparison {
            wave,
            new: new.summary(new_agents),
            previous: previous.summary(paired_agents),
        })
    }

    /// When the server should call [`Rollout::tick`] next at the latest, Unix milliseconds;
    /// `None` when no timer runs.
    pub fn next_deadline_ms(&self, now_ms: u64) -> Option<u64> {
        match &self.state {
            RolloutState::Wave { index, stage } => {
                let wave = &self.waves[*index];
                match stage {
                    WaveStage::Installing => wave.install_deadline_ms,
                    WaveStage::Baking => match wave.bake_ends_ms {
                        Some(ends) if now_ms < ends => Some(ends),
                        _ => wave.deadline_ms,
                    },
                }
            }
            RolloutState::RollingBack { until_ms, .. } => Some(*until_ms),
            _ => None,
        }
    }

    /// Starts the first wave: online agents of it are sent the new version, offline ones
    /// wait as unreachable.
    pub fn start(&mut self, now_ms: u64) -> Result<Vec<Action>, RolloutError> {
        if self.state != RolloutState::Pending {
            return Err(RolloutError::Start {
                rollout: self.id.clone(),
                state: self.state.name(),
            });
        }
        let mut out = Vec::new();
        out.push(Action::Log(RolloutEvent::Started {
            at_ms: now_ms,
            targets: self.agents.len(),
            waves: self.waves.len(),
        }));
        self.start_wave(0, now_ms, &mut out);
        self.advance(now_ms, &mut out);
        Ok(out)
    }

    /// An agent connected (`online`) or its connection ended. The server must drop stale wills
    /// (a will whose session is older than the latest birth) before calling this.
    pub fn on_presence(&mut self, agent: &str, online: bool, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(status) = self.agents.get_mut(agent) else {
            return out;
        };
        status.online = online;

        let awaiting_its_wave = |status: &AgentStatus, index: usize| {
            status.wave <= index
                && matches!(
                    status.phase,
                    AgentPhase::Unreachable { .. } | AgentPhase::Waiting
                )
        };
        match (&self.state, online) {
            (RolloutState::Wave { index, .. } | RolloutState::Paused { index, .. }, false)
                if status.wave == *index =>
            {
                if status.assigned_ms.is_some() {
                    status.dropped = true;
                }
                let without_outcome = matches!(
                    status.phase,
                    AgentPhase::Waiting
                        | AgentPhase::Assigned { .. }
                        | AgentPhase::Installing { .. }
                );
                if without_outcome {
                    status.phase = AgentPhase::Unreachable { since_ms: now_ms };
                }
            }
            (RolloutState::Wave { index, .. }, true) if awaiting_its_wave(status, *index) => {
                let index = *index;
                if status.wave < index {
                    status.wave = index;
                    self.waves[index].joined.push(agent.to_owned());
                }
                assign(agent, status, &self.bundle, now_ms, &mut out);
                out.push(Action::Log(RolloutEvent::AgentReturned {
                    at_ms: now_ms,
                    agent: agent.to_owned(),
                    wave: index,
                }));
            }
            (RolloutState::Paused { index, .. }, true) if awaiting_its_wave(status, *index) => {
                let index = *index;
                if status.wave < index {
                    status.wave = index;
                    self.waves[index].joined.push(agent.to_owned());
                }
                // It holds the retained new version if it was sent one; otherwise it gets it
                // on resume.
                status.phase = match status.assigned_ms {
                    Some(at_ms) => AgentPhase::Assigned { at_ms },
                    None => AgentPhase::Waiting,
                };
            }
            _ => {}
        }

        self.advance(now_ms, &mut out);
        out
    }

    /// An agent reported an event. Events of other rollouts are ignored; install steps count
    /// only for the new bundle, and an activation of an agent's previous bundle confirms its
    /// rollback.
    pub fn on_event(&mut self, agent: &str, event: &Event, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let ours = event.rollout.as_deref().is_none_or(|r| r == self.id);
        let Some(status) = self.agents.get_mut(agent).filter(|_| ours) else {
            return out;
        };
        let is_new = event.digest == Some(self.bundle.digest);
        let is_previous =
            event.digest.is_some() && event.digest == status.previous.as_ref().map(|b| b.digest);
        let installing = status.awaits_install();

        if let Some(progress) = install_step(&event.kind).filter(|_| is_new && installing) {
            status.phase = AgentPhase::Installing {
                progress,
                at_ms: now_ms,
            };
        }
        match &event.kind {
            EventKind::SelfTestFailed { reason } if is_new && installing => {
                fail_agent(agent, status, SELF_TEST_STAGE, reason, now_ms, &mut out);
            }
            EventKind::InstallFailed { stage, reason } if is_new && installing => {
                fail_agent(agent, status, stage, reason, now_ms, &mut out);
            }
            EventKind::DesiredStateRejected { reason } if event.rollout.is_some() && installing => {
                fail_agent(agent, status, "desired_state", reason, now_ms, &mut out);
            }
            EventKind::Active { .. } if is_new && installing => {
                status.phase = AgentPhase::Active { at_ms: now_ms };
            }
            EventKind::Active { .. } if is_previous => confirm_rollback(status, now_ms),
            EventKind::Started { active } => {
                self.observe_running(agent, active.as_ref(), now_ms, &mut out);
            }
            _ => {}
        }

        self.advance(now_ms, &mut out);
        out
    }

    /// An agent sent a heartbeat: what it serves, and its inference metrics.
    pub fn on_heartbeat(&mut self, agent: &str, heartbeat: &Heartbeat, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.agents.contains_key(agent) {
            return out;
        }
        self.observe_running(agent, heartbeat.active.as_ref(), now_ms, &mut out);

        let new_digest = self.bundle.digest;
        let Some(status) = self.agents.get_mut(agent) else {
            return out;
        };
        let previous_digest = status.previous.as_ref().map(|b| b.digest);
        for metrics in &heartbeat.models {
            if metrics.digest == new_digest {
                if metrics.self_test_passed == Some(false) && status.awaits_install() {
                    let reason = "self-test failed (reported in a heartbeat)";
                    fail_agent(agent, status, SELF_TEST_STAGE, reason, now_ms, &mut out);
                }
                let counting = matches!(status.phase, AgentPhase::Active { .. });
                status
                    .metrics
                    .observe_new(heartbeat.session, metrics, counting);
            } else if Some(metrics.digest) == previous_digest {
                status.metrics.observe_previous(metrics);
            }
        }

        let serving_new = heartbeat
            .active
            .as_ref()
            .is_some_and(|m| m.digest == new_digest);
        if serving_new && matches!(status.phase, AgentPhase::Active { .. }) {
            status.reported_ms.get_or_insert(now_ms);
        }

        self.advance(now_ms, &mut out);
        out
    }

    /// Lets time pass: install timeouts, bake ends, wave deadlines, rollback timeouts.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        self.advance(now_ms, &mut out);
        out
    }

    /// Stops before any further step; agents keep installing what they were sent, and the
    /// wave's timers stop until [`Rollout::resume`].
    pub fn pause(
        &mut self,
        now_ms: u64,
        reason: impl Into<String>,
    ) -> Result<Vec<Action>, RolloutError> {
        let RolloutState::Wave { index, stage } = self.state else {
            return Err(RolloutError::Pause {
                rollout: self.id.clone(),
                state: self.state.name(),
            });
        };
        let reason = reason.into();
        self.state = RolloutState::Paused {
            index,
            stage,
            since_ms: now_ms,
            reason: reason.clone(),
            failure: None,
        };
        Ok(vec![Action::Log(RolloutEvent::Paused {
            at_ms: now_ms,
            wave: index,
            reason,
        })])
    }

    /// Continues a paused rollout. After an operator's pause the wave carries on with its
    /// timers moved by the time spent paused, and agents that came back meanwhile are sent
    /// the new version. After a failed gate paused it, resuming accepts the failed wave
    /// (recorded as overridden) and starts the next one.
    pub fn resume(&mut self, now_ms: u64) -> Result<Vec<Action>, RolloutError> {
        let RolloutState::Paused {
            index,
            stage,
            since_ms,
            failure,
            ..
        } = self.state.clone()
        else {
            return Err(RolloutError::Resume {
                rollout: self.id.clone(),
                state: self.state.name(),
            });
        };
        let mut out = Vec::new();
        out.push(Action::Log(RolloutEvent::Resumed {
            at_ms: now_ms,
            wave: index,
            overridden: failure.is_some(),
        }));

        if let Some(failure) = failure {
            self.waves[index].outcome = Some(WaveOutcome::Overridden {
                at_ms: now_ms,
                failure,
            });
            self.next_wave(index, now_ms, &mut out);
            self.advance(now_ms, &mut out);
            return Ok(out);
        }

        let paused_for = now_ms.saturating_sub(since_ms);
        let wave = &mut self.waves[index];
        for deadline in [
            &mut wave.install_deadline_ms,
            &mut wave.bake_ends_ms,
            &mut wave.deadline_ms,
        ]
        .into_iter()
        .flatten()
        {
            *deadline = deadline.saturating_add(paused_for);
        }
        self.state = RolloutState::Wave { index, stage };
        for (agent, status) in &mut self.agents {
            let returned =
                status.wave == index && status.online && status.phase == AgentPhase::Waiting;
            if returned {
                assign(agent, status, &self.bundle, now_ms, &mut out);
            }
        }
        self.advance(now_ms, &mut out);
        Ok(out)
    }

    /// Stops the rollout where it is: no further waves and nothing reverted. Works in every
    /// state but the final ones, including while rolling back (the agents already sent back
    /// stay sent back).
    pub fn abort(
        &mut self,
        now_ms: u64,
        reason: impl Into<String>,
    ) -> Result<Vec<Action>, RolloutError> {
        if !self.is_active() {
            return Err(RolloutError::Abort {
                rollout: self.id.clone(),
                state: self.state.name(),
            });
        }
        let reason = reason.into();
        self.state = RolloutState::Aborted {
            at_ms: now_ms,
            reason: reason.clone(),
            index: self.current_wave(),
        };
        Ok(vec![Action::Log(RolloutEvent::Aborted {
            at_ms: now_ms,
            reason,
        })])
    }

    /// Sends every agent that received the new version back to what it ran before, whether
    /// the rollout is running, paused, completed or aborted.
    pub fn rollback(
        &mut self,
        now_ms: u64,
        reason: impl Into<String>,
    ) -> Result<Vec<Action>, RolloutError> {
        let allowed = matches!(
            self.state,
            RolloutState::Wave { .. }
                | RolloutState::Paused { .. }
                | RolloutState::Completed { .. }
                | RolloutState::Aborted { .. }
        );
        if !allowed {
            return Err(RolloutError::Rollback {
                rollout: self.id.clone(),
                state: self.state.name(),
            });
        }
        let mut out = Vec::new();
        let cause = RollbackCause::Operator {
            reason: reason.into(),
        };
        self.begin_rollback(now_ms, cause, &mut out);
        self.advance(now_ms, &mut out);
        Ok(out)
    }

    fn current_wave(&self) -> Option<usize> {
        match self.state {
            RolloutState::Wave { index, .. } | RolloutState::Paused { index, .. } => Some(index),
            _ => None,
        }
    }

    /// Takes in what an agent says it serves: before the agent receives the new version it
    /// keeps the rollback target current; after, it shows activation, a silent revert, or a
    /// confirmed rollback.
    fn observe_running(
        &mut self,
        agent: &str,
        running: Option<&ActiveModel>,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let new_digest = self.bundle.digest;
        let wave_running = self.current_wave();
        let Some(status) = self.agents.get_mut(agent) else {
            return;
        };
        let running_digest = running.map(|m| m.digest);

        if status.assigned_ms.is_none() {
            if running_digest != Some(new_digest) {
                status.previous = running.map(|m| DesiredBundle {
                    digest: m.digest,
                    name: m.name.clone(),
                    version: m.version.clone(),
                });
            }
            return;
        }

        match status.phase {
            _ if status.awaits_install() && running_digest == Some(new_digest) => {
                status.phase = AgentPhase::Active { at_ms: now_ms };
            }
            AgentPhase::Active { .. }
                if running_digest != Some(new_digest) && wave_running == Some(status.wave) =>
            {
                let serving = running.map_or("no model".to_owned(), |m| {
                    format!("{}@{}", m.name, m.version)
                });
                let reason = format!("serves {serving} after activating the new version");
                fail_agent(agent, status, "activate", &reason, now_ms, out);
            }
            AgentPhase::RollingBack { .. } | AgentPhase::RollbackStalled { .. }
                if running_digest == status.previous.as_ref().map(|b| b.digest) =>
            {
                confirm_rollback(status, now_ms);
            }
            _ => {}
        }
    }

    fn start_wave(&mut self, index: usize, now_ms: u64, out: &mut Vec<Action>) {
        let install_ms = secs_ms(self.spec.install_timeout_secs);
        let wave = &mut self.waves[index];
        let bake_ms = secs_ms(wave.bake_secs);
        wave.started_ms = Some(now_ms);
        wave.install_deadline_ms = Some(now_ms.saturating_add(install_ms));
        wave.deadline_ms = Some(now_ms.saturating_add(install_ms).saturating_add(bake_ms));
        self.state = RolloutState::Wave {
            index,
            stage: WaveStage::Installing,
        };

        let (mut assigned, mut unreachable) = (0, 0);
        for (agent, status) in &mut self.agents {
            if status.wave != index || status.phase != AgentPhase::Waiting {
                continue;
            }
            if status.online {
                assign(agent, status, &self.bundle, now_ms, out);
                assigned += 1;
            } else {
                status.phase = AgentPhase::Unreachable { since_ms: now_ms };
                unreachable += 1;
            }
        }
        out.push(Action::Log(RolloutEvent::WaveStarted {
            at_ms: now_ms,
            wave: index,
            assigned,
            unreachable,
        }));
    }

    /// Moves the rollout as far as `now_ms` allows. Each pass either returns or moves to a
    /// later stage or wave, so the loop ends.
    fn advance(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        loop {
            match self.state.clone() {
                RolloutState::Wave { index, stage } => {
                    let values = gates::evaluate(&self.spec.gates, &self.tally(index));
                    self.waves[index].gates = values.clone();

                    if let Some(breach) =
                        values.iter().find(|v| v.gate.decides_early() && !v.passed)
                    {
                        self.fail_wave(index, breach, now_ms, out);
                        return;
                    }
                    match stage {
                        WaveStage::Installing => {
                            if !self.install_stage_over(index, now_ms) {
                                return;
                            }
                            self.start_bake(index, now_ms, out);
                        }
                        WaveStage::Baking => {
                            if !self.decide_bake(index, &values, now_ms, out) {
                                return;
                            }
                        }
                    }
                }
                RolloutState::RollingBack {
                    until_ms, cause, ..
                } => {
                    let waiting: Vec<&mut AgentStatus> = self
                        .agents
                        .values_mut()
                        .filter(|a| matches!(a.phase, AgentPhase::RollingBack { .. }))
                        .collect();
                    if !waiting.is_empty() && now_ms < until_ms {
                        return;
                    }
                    for status in waiting {
                        if let AgentPhase::RollingBack { since_ms } = status.phase {
                            status.phase = AgentPhase::RollbackStalled { since_ms };
                        }
                    }
                    let confirmed = self
                        .agents
                        .values()
                        .filter(|a| matches!(a.phase, AgentPhase::RolledBack { .. }))
                        .count();
                    out.push(Action::Log(RolloutEvent::RolledBack {
                        at_ms: now_ms,
                        confirmed,
                        stragglers: self.stragglers().map(str::to_owned).collect(),
                    }));
                    self.state = RolloutState::RolledBack {
                        at_ms: now_ms,
                        cause,
                    };
                    return;
                }
                _ => return,
            }
        }
    }

    /// The install stage ends once no reachable agent is still installing, or at its
    /// deadline.
    fn install_stage_over(&self, index: usize, now_ms: u64) -> bool {
        let wave = &self.waves[index];
        if wave.install_deadline_ms.is_some_and(|d| now_ms >= d) {
            return true;
        }
        !self
            .members(index)
            .any(|status| status.online && !status.phase.has_outcome())
    }

    fn start_bake(&mut self, index: usize, now_ms: u64, out: &mut Vec<Action>) {
        let wave = &mut self.waves[index];
        let until_ms = now_ms.saturating_add(secs_ms(wave.bake_secs));
        wave.bake_started_ms = Some(now_ms);
        wave.bake_ends_ms = Some(until_ms);
        self.state = RolloutState::Wave {
            index,
            stage: WaveStage::Baking,
        };
        out.push(Action::Log(RolloutEvent::BakeStarted {
            at_ms: now_ms,
            wave: index,
            until_ms,
        }));
    }

    /// At the end of the bake: a failed gate fails the wave; otherwise the wave passes once
    /// enough agents reported, or fails at its deadline if they never do. Returns whether the
    /// rollout moved on.
    fn decide_bake(
        &mut self,
        index: usize,
        values: &[GateValue],
        now_ms: u64,
        out: &mut Vec<Action>,
    ) -> bool {
        let wave = &self.waves[index];
        let bake_over = wave.bake_ends_ms.is_some_and(|end| now_ms >= end);
        if !bake_over {
            return false;
        }
        if let Some(failed) = values
            .iter()
            .find(|v| v.gate != GateName::Reporting && !v.passed)
        {
            self.fail_wave(index, failed, now_ms, out);
            return true;
        }

        let reporting = values
            .iter()
            .find(|v| v.gate == GateName::Reporting)
            .expect("invariant: evaluate always includes the reporting gate");
        if reporting.passed {
            out.push(Action::Log(RolloutEvent::GatesEvaluated {
                at_ms: now_ms,
                wave: index,
                gates: values.to_vec(),
                passed: true,
            }));
            out.push(Action::Log(RolloutEvent::WavePassed {
                at_ms: now_ms,
                wave: index,
            }));
            self.waves[index].outcome = Some(WaveOutcome::Passed { at_ms: now_ms });
            self.next_wave(index, now_ms, out);
            return true;
        }

        let timed_out = wave.deadline_ms.is_some_and(|d| now_ms >= d);
        if timed_out {
            let reporting = reporting.clone();
            self.fail_wave(index, &reporting, now_ms, out);
            return true;
        }
        false
    }

    fn next_wave(&mut self, index: usize, now_ms: u64, out: &mut Vec<Action>) {
        if index + 1 < self.waves.len() {
            self.start_wave(index + 1, now_ms, out);
        } else {
            self.complete(now_ms, out);
        }
    }

    fn fail_wave(&mut self, index: usize, failed: &GateValue, now_ms: u64, out: &mut Vec<Action>) {
        let failure = GateFailure {
            wave: index,
            at_ms: now_ms,
            gate: failed.gate,
            value: failed.value,
            threshold: failed.threshold,
            basis: failed.basis,
        };
        let wave = &mut self.waves[index];
        wave.outcome = Some(WaveOutcome::Failed(failure.clone()));
        out.push(Action::Log(RolloutEvent::GatesEvaluated {
            at_ms: now_ms,
            wave: index,
            gates: wave.gates.clone(),
            passed: false,
        }));
        out.push(Action::Log(RolloutEvent::GateFailed(failure.clone())));

        match self.spec.on_failure {
            OnFailure::Rollback => self.begin_rollback(now_ms, RollbackCause::Gate(failure), out),
            OnFailure::Pause => {
                let stage = match self.state {
                    RolloutState::Wave { stage, .. } => stage,
                    _ => WaveStage::Baking,
                };
                let reason = describe_failure(&failure);
                out.push(Action::Log(RolloutEvent::Paused {
                    at_ms: now_ms,
                    wave: index,
                    reason: reason.clone(),
                }));
                self.state = RolloutState::Paused {
                    index,
                    stage,
                    since_ms: now_ms,
                    reason,
                    failure: Some(failure),
                };
            }
        }
    }

    fn begin_rollback(&mut self, now_ms: u64, cause: RollbackCause, out: &mut Vec<Action>) {
        let mut agents = 0;
        for (agent, status) in &mut self.agents {
            let reverted = matches!(status.phase, AgentPhase::RolledBack { .. });
            if status.assigned_ms.is_none() || reverted {
                continue;
            }
            out.push(Action::SetDesired {
                agent: agent.clone(),
                bundle: status.previous.clone(),
            });
            agents += 1;
            status.phase = match status.previous {
                Some(_) => AgentPhase::RollingBack { since_ms: now_ms },
                // Nothing to wait for: the desired state no longer names the new bundle.
                None => AgentPhase::RolledBack { at_ms: now_ms },
            };
        }
        out.push(Action::Log(RolloutEvent::RollbackStarted {
            at_ms: now_ms,
            agents,
            cause: cause.clone(),
        }));
        self.state = RolloutState::RollingBack {
            since_ms: now_ms,
            until_ms: now_ms.saturating_add(secs_ms(self.spec.install_timeout_secs)),
            cause,
        };
    }

    /// Every wave passed. Agents still offline are sent the new version anyway, since it
    /// passed every gate: their retained desired state brings them up to date on return.
    fn complete(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let mut stragglers = 0;
        for (agent, status) in &mut self.agents {
            let never_sent = status.assigned_ms.is_none()
                && matches!(
                    status.phase,
                    AgentPhase::Unreachable { .. } | AgentPhase::Waiting
                );
            if never_sent {
                assign(agent, status, &self.bundle, now_ms, out);
                stragglers += 1;
            }
        }
        out.push(Action::Log(RolloutEvent::Completed {
            at_ms: now_ms,
            stragglers,
        }));
        self.state = RolloutState::Completed { at_ms: now_ms };
    }

    /// The agents counting in wave `index` now: its cohort and those that joined it, less
    /// those that moved on to a later wave.
    fn members(&self, index: usize) -> impl Iterator<Item = &AgentStatus> {
        let wave = &self.waves[index];
        wave.cohort
            .iter()
            .chain(&wave.joined)
            .filter_map(|id| self.agents.get(id))
            .filter(move |status| status.wave == index)
    }

    /// Counts wave `index`'s agents for its gates. An agent is reachable when it has an
    /// outcome, or is online and was not sent the new version only after the bake began (a
    /// late return counts once it reports, never against the wave).
    fn tally(&self, index: usize) -> Tally {
        let bake_started = self.waves[index].bake_started_ms;
        let mut tally = Tally::default();
        for status in self.members(index) {
            if status.assigned_ms.is_some() {
                tally.received += 1;
                tally.dropped += u64::from(status.dropped);
            }

            let late = matches!((bake_started, status.assigned_ms), (Some(bake), Some(sent)) if sent > bake);
            let reachable = status.phase.has_outcome() || (status.online && !late);
            if !reachable {
                continue;
            }
            tally.reachable += 1;
            match status.phase {
                AgentPhase::Failed { .. } => {
                    tally.install_failures += 1;
                    tally.reported += 1;
                }
                AgentPhase::SelfTestFailed { .. } => {
                    tally.self_test_failures += 1;
                    tally.reported += 1;
                }
                AgentPhase::Active { .. } => {
                    tally.reported += u64::from(status.reported_ms.is_some());
                    tally.new.add(&status.metrics.new);
                    tally.new_agents += 1;
                    if let Some(previous) = &status.metrics.previous {
                        tally.new_paired.add(&status.metrics.new);
                        tally.previous.add(previous);
                        tally.paired_agents += 1;
                    }
                }
                _ => {}
            }
        }
        tally
    }
}

/// Refuses a new rollout whose targets overlap an active one, naming the rollout and agents.
pub fn check_overlap<'a, S: AsRef<str>>(
    existing: impl IntoIterator<Item = &'a Rollout>,
    new_targets: impl IntoIterator<Item = S>,
) -> Result<(), RolloutError> {
    let wanted: BTreeSet<String> = new_targets
        .into_iter()
        .map(|s| s.as_ref().to_owned())
        .collect();
    for rollout in existing {
        if !rollout.is_active() {
            continue;
        }
        let agents: Vec<String> = rollout
            .targets()
            .filter(|agent| wanted.contains(*agent))
            .map(str::to_owned)
            .collect();
        if !agents.is_empty() {
            return Err(RolloutError::CheckOverlap {
                rollout: rollout.id.clone(),
                agents,
            });
        }
    }
    Ok(())
}

/// A target's value of the stratification label.
fn stratum_of<'t>(target: &'t Target, stratify_by: Option<&str>) -> Option<&'t str> {
    target.labels.get(stratify_by?).map(String::as_str)
}

/// The install step an event reports, if it reports one.
fn install_step(kind: &EventKind) -> Option<InstallProgress> {
    match kind {
        EventKind::Downloading { received, total } => Some(InstallProgress::Downloading {
            received: *received,
            total: *total,
        }),
        EventKind::Verifying => Some(InstallProgress::Verifying),
        EventKind::Staged => Some(InstallProgress::Staged),
        EventKind::SelfTestPassed => Some(InstallProgress::SelfTestPassed),
        _ => None,
    }
}

/// Sends the new version to one agent.
fn assign(
    agent: &str,
    status: &mut AgentStatus,
    bundle: &DesiredBundle,
    now_ms: u64,
    out: &mut Vec<Action>,
) {
    out.push(Action::SetDesired {
        agent: agent.to_owned(),
        bundle: Some(bundle.clone()),
    });
    status.assigned_ms = Some(now_ms);
    status.phase = AgentPhase::Assigned { at_ms: now_ms };
}

/// Records a failed install; a failure in the self-test stage counts as a self-test failure.
fn fail_agent(
    agent: &str,
    status: &mut AgentStatus,
    stage: &str,
    reason: &str,
    now_ms: u64,
    out: &mut Vec<Action>,
) {
    status.phase = if stage == SELF_TEST_STAGE {
        AgentPhase::SelfTestFailed {
            reason: reason.to_owned(),
            at_ms: now_ms,
        }
    } else {
        AgentPhase::Failed {
            stage: stage.to_owned(),
            reason: reason.to_owned(),
            at_ms: now_ms,
        }
    };
    out.push(Action::Log(RolloutEvent::AgentFailed {
        at_ms: now_ms,
        agent: agent.to_owned(),
        wave: status.wave,
        stage: stage.to_owned(),
        reason: reason.to_owned(),
    }));
}

fn confirm_rollback(status: &mut AgentStatus, now_ms: u64) {
    if matches!(
        status.phase,
        AgentPhase::RollingBack { .. } | AgentPhase::RollbackStalled { .. }
    ) {
        status.phase = AgentPhase::RolledBack { at_ms: now_ms };
    }
}

fn describe_failure(failure: &GateFailure) -> String {
    let value = failure
        .value
        .map_or("nothing".to_owned(), |v| format!("{v}"));
    format!(
        "wave {} failed gate {:?}: measured {value} against {} over {}",
        failure.wave, failure.gate, failure.threshold, failure.basis
    )
}

fn secs_ms(secs: u64) -> u64 {
    secs.saturating_mul(1000)
}

fn check_rollout_id(id: &str) -> Result<(), RolloutError> {
    let valid_chars = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if id.is_empty() || id.len() > MAX_ID_LEN || !valid_chars {
        return Err(RolloutError::CheckId {
            rollout: id.to_owned(),
        });
    }
    Ok(())
}
