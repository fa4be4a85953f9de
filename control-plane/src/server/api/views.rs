//! What the API answers with, built from the hub's state and the rollout engine's
//! accessors (never from the engine's persisted form).

use std::collections::BTreeMap;

use flotilla_shared::wire::DesiredState;
use serde::Serialize;

use crate::rollout::{AgentPhase, Comparison, GateValue, Rollout, RolloutState, WaveStatus};
use crate::server::hub::{Dropped, Hub};
use crate::server::registry::AgentRecord;
use crate::server::store::EventRecord;

/// An agent with what the server last asked of it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AgentView {
    /// The registry record.
    #[serde(flatten)]
    pub record: AgentRecord,
    /// `name@version` it serves, or `none`.
    pub version: String,
    /// The desired state last issued to it.
    #[schema(value_type = Option<Object>)]
    pub desired: Option<DesiredState>,
    /// The active rollout it is in.
    pub rollout: Option<String>,
}

impl AgentView {
    /// Builds the view.
    pub fn new(record: AgentRecord, hub: &Hub) -> Self {
        let rollout = hub.active_rollout_of(&record.id).map(str::to_owned);
        Self {
            version: record.version_label(),
            desired: hub.desired_of(&record.id).cloned(),
            rollout,
            record,
        }
    }
}

/// The publisher keys trusted now, how they came to be, and who has not caught up.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TrustView {
    /// Version of the key set trusted now; null when the server trusts no publisher key.
    pub version: Option<u64>,
    /// Distinct signatures a bundle needs.
    pub threshold: Option<usize>,
    /// The publisher keys trusted now.
    pub publishers: Vec<PublisherView>,
    /// Id of the control-plane key agents on this key set require, hex.
    pub control_plane: String,
    /// Every key set kept (what desired states carry), oldest first.
    pub key_sets: Vec<KeySetView>,
    /// Agents whose latest report names an older key set (0: none reported yet).
    pub behind: Vec<AgentKeySet>,
    /// Agents that report a key set of a version this server has with another digest: they
    /// follow another chain of key sets.
    pub forked: Vec<ForkedAgent>,
}

/// An agent on another chain of key sets than the server's.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ForkedAgent {
    /// Agent id.
    pub agent: String,
    /// Key set version it trusts.
    pub key_set: u64,
    /// Digest of the set it reports, hex.
    pub reported: String,
    /// Digest of this server's set of that version, hex.
    pub expected: String,
    /// Whether it is connected.
    pub online: bool,
}

/// One trusted publisher key.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PublisherView {
    /// Key id: SHA-256 of the raw key, hex.
    pub id: String,
    /// The key as PEM.
    pub pem: String,
}

/// One key set of the chain.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeySetView {
    /// Its version.
    pub version: u64,
    /// Its publisher key ids, hex.
    pub publishers: Vec<String>,
    /// Its threshold.
    pub threshold: u32,
    /// The control-plane key id it moved to, hex, if it named one.
    pub control_plane: Option<String>,
    /// Sequence floors it reset, by model.
    pub reset_floors: BTreeMap<String, u64>,
    /// When it was made, Unix seconds.
    pub issued_at: u64,
}

/// An agent and the key set it reports.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AgentKeySet {
    /// Agent id.
    pub agent: String,
    /// Key set version it trusts.
    pub key_set: u64,
    /// Whether it is connected.
    pub online: bool,
}

impl TrustView {
    /// Builds the view.
    pub fn new(hub: &Hub) -> Self {
        let (keys, chain) = hub.trust();
        let version = keys.map(|k| k.version());
        let publishers = keys
            .map(|k| {
                k.publishers()
                    .iter()
                    .map(|p| PublisherView {
                        id: p.id().0.to_hex(),
                        pem: p.to_pem().unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let key_sets = chain
            .iter()
            .filter_map(|signed| signed.key_set().ok())
            .map(|set| KeySetView {
                version: set.version,
                publishers: set.publishers.iter().map(|p| p.id().0.to_hex()).collect(),
                threshold: set.threshold,
                control_plane: set.control_plane.map(|k| k.id().0.to_hex()),
                reset_floors: set.reset_floors,
                issued_at: set.issued_at,
            })
            .collect();
        let behind = hub
            .all_agents()
            .filter(|a| version.is_some_and(|v| a.key_set < v))
            .map(|a| AgentKeySet {
                agent: a.id.clone(),
                key_set: a.key_set,
                online: a.online,
            })
            .collect();
        let forked = hub
            .all_agents()
            .filter_map(|a| {
                let expected = hub.key_set_fork(a)?;
                Some(ForkedAgent {
                    agent: a.id.clone(),
                    key_set: a.key_set,
                    reported: a.key_set_digest?.to_hex(),
                    expected: expected.to_hex(),
                    online: a.online,
                })
            })
            .collect();
        Self {
            version,
            threshold: keys.map(|k| k.threshold()),
            publishers,
            control_plane: hub.control_plane_key().id().0.to_hex(),
            key_sets,
            behind,
            forked,
        }
    }
}

/// Fleet counts.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FleetSummary {
    /// Agents known.
    pub agents: usize,
    /// Agents connected.
    pub online: usize,
    /// Agents not connected.
    pub offline: usize,
    /// Agents by `name@version` served.
    pub by_version: BTreeMap<String, usize>,
    /// Agents by health.
    pub by_health: BTreeMap<String, usize>,
    /// Ids of active rollouts.
    pub active_rollouts: Vec<String>,
    /// Bundles held.
    pub bundles: usize,
    /// MQTT messages counted and dropped.
    pub dropped_messages: Dropped,
    /// Telemetry items that never arrived, over all agents.
    pub telemetry_missing: u64,
    /// Agents waiting for an admin to accept their key (`/api/v1/pending-agents`).
    pub pending_agents: usize,
    /// Keys approved ahead for agents not seen yet (`/api/v1/approved-agents`).
    pub approved_ahead: usize,
}

impl FleetSummary {
    /// Counts the hub's state.
    pub fn new(hub: &Hub) -> Self {
        let (mut total, mut online, mut telemetry_missing) = (0, 0, 0);
        let mut by_version = BTreeMap::new();
        let mut by_health = BTreeMap::new();
        for agent in hub.all_agents() {
            total += 1;
            online += usize::from(agent.online);
            telemetry_missing += agent.telemetry_missing;
            *by_version.entry(agent.version_label()).or_default() += 1;
            *by_health
                .entry(agent.health_label().to_owned())
                .or_default() += 1;
        }
        Self {
            agents: total,
            online,
            offline: total - online,
            by_version,
            by_health,
            active_rollouts: hub
                .rollouts()
                .into_iter()
                .filter(|r| r.is_active())
                .map(|r| r.id().to_owned())
                .collect(),
            bundles: hub.bundles().len(),
            dropped_messages: hub.dropped(),
            telemetry_missing,
            pending_agents: hub.pending_count(),
            approved_ahead: hub.approvals().len(),
        }
    }
}

/// A rollout as operators read it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RolloutView {
    /// Rollout id.
    pub id: String,
    /// The bundle rolled out.
    #[schema(value_type = Object)]
    pub bundle: flotilla_shared::wire::DesiredBundle,
    /// When it was created, Unix milliseconds.
    pub created_ms: u64,
    /// State name: pending, wave, paused, completed, aborted, rolling_back, rolled_back.
    pub state: &'static str,
    /// The full state, with its details.
    #[schema(value_type = Object)]
    pub status: RolloutState,
    /// The wave under way, if one is.
    pub current_wave: Option<usize>,
    /// The spec it runs.
    #[schema(value_type = Object)]
    pub spec: crate::rollout::RolloutSpec,
    /// Agents targeted.
    pub targets: usize,
    /// Agents the selector matched that already ran the bundle.
    pub skipped: Vec<String>,
    /// Agents by phase over the whole rollout.
    pub phases: BTreeMap<String, usize>,
    /// Every wave.
    pub waves: Vec<WaveView>,
    /// The first failed gate, with its numbers.
    #[schema(value_type = Option<Object>)]
    pub failure: Option<crate::rollout::GateFailure>,
    /// Every agent's part, by id.
    pub agents: BTreeMap<String, AgentPart>,
}

/// One agent's part in a rollout.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AgentPart {
    /// Its wave.
    pub wave: usize,
    /// Its value of the stratification label.
    pub stratum: Option<String>,
    /// Whether it is connected, as far as the rollout knows.
    pub online: bool,
    /// Where it is: `{"phase": "active", "at_ms": ...}` and the like.
    #[schema(value_type = Object)]
    pub phase: AgentPhase,
    /// What it ran before: the rollback target.
    #[schema(value_type = Option<Object>)]
    pub previous: Option<flotilla_shared::wire::DesiredBundle>,
    /// When the new version was sent to it.
    pub assigned_ms: Option<u64>,
    /// When it first reported serving the new version.
    pub reported_ms: Option<u64>,
    /// Whether it dropped offline during its wave after receiving the new version.
    pub dropped: bool,
}

impl From<&crate::rollout::AgentStatus> for AgentPart {
    fn from(status: &crate::rollout::AgentStatus) -> Self {
        Self {
            wave: status.wave,
            stratum: status.stratum.clone(),
            online: status.online,
            phase: status.phase.clone(),
            previous: status.previous.clone(),
            assigned_ms: status.assigned_ms,
            reported_ms: status.reported_ms,
            dropped: status.dropped,
        }
    }
}

/// One wave's progress.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WaveView {
    /// Wave index, from 0.
    pub index: usize,
    /// Agents in it (its cohort plus latecomers that joined).
    pub agents: Vec<String>,
    /// Its agents by phase.
    pub phases: BTreeMap<String, usize>,
    /// Bake time, seconds.
    pub bake_secs: u64,
    /// When it started, Unix milliseconds.
    pub started_ms: Option<u64>,
    /// When its bake ends.
    pub bake_ends_ms: Option<u64>,
    /// The latest gate evaluation.
    #[schema(value_type = Vec<Object>)]
    pub gates: Vec<GateValue>,
    /// How it ended.
    #[schema(value_type = Option<Object>)]
    pub outcome: Option<crate::rollout::WaveOutcome>,
    /// The new version's metrics next to the previous version's on this wave's agents.
    #[schema(value_type = Option<Object>)]
    pub comparison: Option<Comparison>,
}

impl RolloutView {
    /// Builds the view from the engine's accessors.
    pub fn new(rollout: &Rollout) -> Self {
        let agents: BTreeMap<String, AgentPart> = rollout
            .agents()
            .map(|(id, status)| (id.to_owned(), AgentPart::from(status)))
            .collect();
        let mut phases = BTreeMap::new();
        for status in agents.values() {
            *phases
                .entry(phase_name(&status.phase).to_owned())
                .or_default() += 1;
        }
        let waves = rollout
            .waves()
            .iter()
            .map(|wave| WaveView::new(rollout, wave, &agents))
            .collect();
        Self {
            id: rollout.id().to_owned(),
            bundle: rollout.bundle().clone(),
            created_ms: rollout.created_ms(),
            state: rollout.state().name(),
            status: rollout.state().clone(),
            current_wave: wave_index(rollout.state()),
            spec: rollout.spec().clone(),
            targets: agents.len(),
            skipped: rollout.skipped().to_vec(),
            phases,
            waves,
            failure: rollout.failure().cloned(),
            agents,
        }
    }
}

impl WaveView {
    fn new(rollout: &Rollout, wave: &WaveStatus, agents: &BTreeMap<String, AgentPart>) -> Self {
        let members: Vec<String> = agents
            .iter()
            .filter(|(_, s)| s.wave == wave.index)
            .map(|(id, _)| id.clone())
            .collect();
        let mut phases = BTreeMap::new();
        for id in &members {
            *phases
                .entry(phase_name(&agents[id].phase).to_owned())
                .or_default() += 1;
        }
        Self {
            index: wave.index,
            agents: members,
            phases,
            bake_secs: wave.bake_secs,
            started_ms: wave.started_ms,
            bake_ends_ms: wave.bake_ends_ms,
            gates: wave.gates.clone(),
            outcome: wave.outcome.clone(),
            comparison: wave.started_ms.and(rollout.comparison(wave.index)),
        }
    }
}

/// A page of the event log.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventsPage {
    /// The events, oldest first.
    pub events: Vec<EventRecord>,
    /// Pass as `after` for the next page.
    pub next_after: Option<u64>,
}

/// The phase's name, as in its JSON form.
pub fn phase_name(phase: &AgentPhase) -> &'static str {
    match phase {
        AgentPhase::Waiting => "waiting",
        AgentPhase::Unreachable { .. } => "unreachable",
        AgentPhase::Assigned { .. } => "assigned",
        AgentPhase::Installing { .. } => "installing",
        AgentPhase::Active { .. } => "active",
        AgentPhase::Failed { .. } => "failed",
        AgentPhase::SelfTestFailed { .. } => "self_test_failed",
        AgentPhase::RollingBack { .. } => "rolling_back",
        AgentPhase::RolledBack { .. } => "rolled_back",
        AgentPhase::RollbackStalled { .. } => "rollback_stalled",
    }
}

/// The wave a rollout is in or stopped in.
pub fn wave_index(state: &RolloutState) -> Option<usize> {
    match state {
        RolloutState::Wave { index, .. } | RolloutState::Paused { index, .. } => Some(*index),
        _ => None,
    }
}
