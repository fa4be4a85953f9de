//! Engine tests: whole rollouts driven by simulated agents on an explicit clock.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_shared::manifest::Backend;
use flotilla_shared::wire::{
    ActiveModel, DesiredBundle, Event, EventKind, Health, Heartbeat, Histogram, HostMetrics,
    VersionMetrics,
};
use flotilla_shared::Sha256Digest;

use super::*;

/// Start of every simulated timeline, Unix milliseconds.
const T0: u64 = 1_700_000_000_000;

fn release(version: &str) -> DesiredBundle {
    DesiredBundle {
        digest: Sha256Digest::of(format!("detector@{version}").as_bytes()),
        name: "detector".into(),
        version: version.into(),
    }
}

fn new_version() -> DesiredBundle {
    release("2.0.0")
}

fn old_version() -> DesiredBundle {
    release("1.0.0")
}

fn agent_name(i: usize) -> String {
    format!("edge-{i:02}")
}

/// `n` online agents running 1.0.0, labelled `hw` orin or xavier.
fn fleet(n: usize) -> Vec<Target> {
    (0..n)
        .map(|i| Target {
            agent: agent_name(i),
            labels: BTreeMap::from([(
                "hw".to_owned(),
                if i % 2 == 0 { "orin" } else { "xavier" }.to_owned(),
            )]),
            online: true,
            running: Some(old_version()),
        })
        .collect()
}

fn spec(waves: &[(WaveSize, u64)]) -> RolloutSpec {
    RolloutSpec {
        bundle: "detector@2.0.0".parse().unwrap(),
        selector: Selector::everything(),
        waves: waves
            .iter()
            .map(|&(size, bake_secs)| WaveSpec { size, bake_secs })
            .collect(),
        gates: Gates::default(),
        on_failure: OnFailure::Rollback,
        install_timeout_secs: 300,
        stratify_by: None,
    }
}

fn plan(id: &str, spec: RolloutSpec, fleet: &[Target]) -> Rollout {
    Rollout::new(id, spec, new_version(), fleet, T0).unwrap()
}

/// The desired states in `actions`, as agent → version (`None`: keep whatever runs).
fn desired(actions: &[Action]) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for action in actions {
        if let Action::SetDesired { agent, bundle } = action {
            let previous = out.insert(agent.clone(), bundle.as_ref().map(|b| b.version.clone()));
            assert!(
                previous.is_none(),
                "{agent} sent two desired states in one call"
            );
        }
    }
    out
}

fn events(actions: &[Action]) -> Vec<&RolloutEvent> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Log(event) => Some(event),
            Action::SetDesired { .. } => None,
        })
        .collect()
}

fn gate(rollout: &Rollout, wave: usize, name: GateName) -> &GateValue {
    rollout
        .gate_values(wave)
        .iter()
        .find(|v| v.gate == name)
        .unwrap_or_else(|| panic!("{name:?} not evaluated in wave {wave}"))
}

/// A fleet of simulated agents around one rollout, on an explicit clock.
struct Sim {
    rollout: Rollout,
    now: u64,
    /// What each agent serves.
    serving: BTreeMap<String, Option<DesiredBundle>>,
    /// Cumulative metrics per agent and version, as the agent would report them.
    served: BTreeMap<String, BTreeMap<Sha256Digest, VersionMetrics>>,
    /// Every action so far.
    log: Vec<Action>,
}

impl Sim {
    fn new(rollout: Rollout, fleet: &[Target]) -> Self {
        let serving = fleet
            .iter()
            .map(|t| (t.agent.clone(), t.running.clone()))
            .collect();
        Self {
            rollout,
            now: T0,
            serving,
            served: BTreeMap::new(),
            log: Vec::new(),
        }
    }

    fn record(&mut self, actions: Vec<Action>) -> Vec<Action> {
        self.log.extend(actions.iter().cloned());
        actions
    }

    fn start(&mut self) -> Vec<Action> {
        let actions = self.rollout.start(self.now).unwrap();
        self.record(actions)
    }

    /// Moves the clock forward and ticks.
    fn after(&mut self, secs: u64) -> Vec<Action> {
        self.now += secs * 1000;
        let actions = self.rollout.tick(self.now);
        self.record(actions)
    }

    fn cohort(&self, wave: usize) -> Vec<String> {
        self.rollout.waves()[wave].cohort.clone()
    }

    fn phase(&self, agent: &str) -> AgentPhase {
        self.rollout.agent(agent).unwrap().phase.clone()
    }

    fn event(&mut self, agent: &str, digest: &DesiredBundle, kind: EventKind) -> Vec<Action> {
        let event = Event {
            session: 1,
            rollout: Some(self.rollout.id().to_owned()),
            digest: Some(digest.digest),
            kind,
        };
        let actions = self.rollout.on_event(agent, &event, self.now);
        self.record(actions)
    }

    fn presence(&mut self, agent: &str, online: bool) -> Vec<Action> {
        let actions = self.rollout.on_presence(agent, online, self.now);
        self.record(actions)
    }

    /// The full install sequence of the new version, ending active.
    fn install(&mut self, agent: &str) -> Vec<Action> {
        let new = new_version();
        let mut actions = Vec::new();
        for kind in [
            EventKind::Downloading {
                received: 4,
                total: 4,
            },
            EventKind::Verifying,
            EventKind::Staged,
            EventKind::SelfTestPassed,
            EventKind::Active {
                name: new.name.clone(),
                version: new.version.clone(),
            },
        ] {
            actions.extend(self.event(agent, &new, kind));
        }
        self.serving.insert(agent.to_owned(), Some(new));
        actions
    }

    fn fail_install(&mut self, agent: &str, stage: &str) -> Vec<Action> {
        let kind = EventKind::InstallFailed {
            stage: stage.into(),
            reason: format!("{stage} broke"),
        };
        self.event(agent, &new_version(), kind)
    }

    fn fail_self_test(&mut self, agent: &str) -> Vec<Action> {
        let kind = EventKind::SelfTestFailed {
            reason: "golden input 0: max abs diff 0.4".into(),
        };
        self.event(agent, &new_version(), kind)
    }

    /// The agent serves `requests` on whatever it runs, then sends a heartbeat.
    fn serve(&mut self, agent: &str, requests: u64, errors: u64, latency_ms: f64) -> Vec<Action> {
        if let Some(bundle) = self.serving[agent].clone() {
            let metrics = self
                .served
                .entry(agent.to_owned())
                .or_default()
                .entry(bundle.digest)
                .or_insert_with(|| VersionMetrics {
                    name: bundle.name.clone(),
                    version: bundle.version.clone(),
                    digest: bundle.digest,
                    requests: 0,
                    errors: 0,
                    latency: Histogram::default(),
                    self_test_passed: None,
                });
            metrics.requests += requests;
            metrics.errors += errors;
            for _ in 0..requests {
                metrics.latency.observe(latency_ms);
            }
        }
        self.heartbeat(agent)
    }

    fn heartbeat(&mut self, agent: &str) -> Vec<Action> {
        let active = self.serving[agent].as_ref().map(|b| ActiveModel {
            name: b.name.clone(),
            version: b.version.clone(),
            digest: b.digest,
            backend: Backend::Tract,
            provider: "cpu".into(),
        });
        let heartbeat = Heartbeat {
            session: 1,
            uptime_s: 60,
            active,
            health: Health::Ok,
            host: HostMetrics {
                rss_bytes: 1 << 20,
                cpu_percent: 5.0,
            },
            models: self
                .served
                .get(agent)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default(),
            dropped_telemetry: 0,
            key_set: 1,
            key_set_digest: None,
        };
        let actions = self.rollout.on_heartbeat(agent, &heartbeat, self.now);
        self.record(actions)
    }

    /// The agent goes back to `bundle` and says so in a heartbeat.
    fn revert_to(&mut self, agent: &str, bundle: Option<DesiredBundle>) -> Vec<Action> {
        self.serving.insert(agent.to_owned(), bundle);
        self.heartbeat(agent)
    }

    /// Every agent sent the new version in `wave` installs it and serves healthy traffic.
    fn healthy(&mut self, wave: usize) {
        for agent in self.cohort(wave) {
            if self.rollout.agent(&agent).unwrap().assigned_ms.is_some() {
                self.install(&agent);
                self.serve(&agent, 100, 0, 4.0);
            }
        }
    }
}

fn wave_state(rollout: &Rollout) -> Option<(usize, WaveStage)> {
    match rollout.state() {
        RolloutState::Wave { index, stage } => Some((*index, *stage)),
        _ => None,
    }
}

fn new_versions_for(agents: &[String]) -> BTreeMap<String, Option<String>> {
    agents
        .iter()
        .map(|a| (a.clone(), Some("2.0.0".to_owned())))
        .collect()
}

#[test]
fn three_wave_rollout_completes_when_every_gate_holds() {
    let fleet = fleet(10);
    let waves = [
        (WaveSize::Count(1), 60),
        (WaveSize::Percent(30.0), 60),
        (WaveSize::Percent(100.0), 60),
    ];
    let mut sim = Sim::new(plan("r-complete", spec(&waves), &fleet), &fleet);
    let sizes: Vec<usize> = sim.rollout.waves().iter().map(|w| w.cohort.len()).collect();
    assert_eq!(sizes, vec![1, 3, 6]);

    let started = sim.start();
    assert_eq!(desired(&started), new_versions_for(&sim.cohort(0)));
    assert_eq!(wave_state(&sim.rollout), Some((0, WaveStage::Installing)));
    assert_eq!(sim.rollout.next_deadline_ms(sim.now), Some(T0 + 300_000));

    for wave in 0..3 {
        sim.healthy(wave);
        assert_eq!(wave_state(&sim.rollout), Some((wave, WaveStage::Baking)));
        assert_eq!(
            sim.rollout.next_deadline_ms(sim.now),
            Some(sim.now + 60_000)
        );
        assert!(desired(&sim.after(59)).is_empty(), "bake still running");
        let next = sim.after(1);
        if wave < 2 {
            assert_eq!(desired(&next), new_versions_for(&sim.cohort(wave + 1)));
            assert_eq!(
                wave_state(&sim.rollout),
                Some((wave + 1, WaveStage::Installing))
            );
        } else {
            assert!(desired(&next).is_empty());
        }
        assert!(matches!(
            sim.rollout.waves()[wave].outcome,
            Some(WaveOutcome::Passed { .. })
        ));
        assert!(sim.rollout.gate_values(wave).iter().all(|v| v.passed));
        assert_eq!(
            gate(&sim.rollout, wave, GateName::Reporting).value,
            Some(1.0)
        );
    }

    assert!(matches!(
        sim.rollout.state(),
        RolloutState::Completed { .. }
    ));
    assert!(!sim.rollout.is_active());
    let sent: Vec<&Action> = sim
        .log
        .iter()
        .filter(|a| matches!(a, Action::SetDesired { .. }))
        .collect();
    assert_eq!(
        sent.len(),
        10,
        "each agent sent the new version exactly once"
    );
    assert_eq!(
        desired(&sim.log),
        new_versions_for(&fleet.iter().map(|t| t.agent.clone()).collect::<Vec<_>>())
    );
}

/// Wave 0 of five agents (out of eight) with `gates`; `misbehave` acts on its agents after
/// the others installed healthily.
fn first_wave(gates: Gates, misbehave: impl FnOnce(&mut Sim, &[String])) -> Sim {
    let fleet = fleet(8);
    let mut spec = spec(&[(WaveSize::Count(5), 60), (WaveSize::Percent(100.0), 60)]);
    spec.gates = gates;
    let mut sim = Sim::new(plan("r-gates", spec, &fleet), &fleet);
    sim.start();
    let cohort = sim.cohort(0);
    misbehave(&mut sim, &cohort);
    for agent in &cohort {
        if matches!(sim.phase(agent), AgentPhase::Assigned { .. }) {
            sim.install(agent);
            sim.serve(agent, 100, 0, 4.0);
        }
    }
    sim
}

fn rolled_back_by(sim: &Sim, name: GateName) -> GateFailure {
    match sim.rollout.state() {
        RolloutState::RollingBack {
            cause: RollbackCause::Gate(failure),
            ..
        }
        | RolloutState::RolledBack {
            cause: RollbackCause::Gate(failure),
            ..
        } => {
            assert_eq!(failure.gate, name, "{failure:?}");
            failure.clone()
        }
        other => panic!("expected a rollback by {name:?}, got {other:?}"),
    }
}

fn passes_wave_zero(sim: &mut Sim) {
    sim.after(60);
    assert!(
        matches!(
            sim.rollout.waves()[0].outcome,
            Some(WaveOutcome::Passed { .. })
        ),
        "{:?}",
        sim.rollout.state()
    );
    assert_eq!(wave_state(&sim.rollout).map(|w| w.0), Some(1));
}

#[test]
fn install_failures_at_a_count_limit_pass_and_above_it_fail_at_once() {
    let gates = Gates {
        max_install_failures: Some(Threshold::Count(1)),
        ..Gates::default()
    };
    let mut at_limit = first_wave(gates.clone(), |sim, cohort| {
        sim.fail_install(&cohort[0], "download");
    });
    passes_wave_zero(&mut at_limit);
    let value = gate(&at_limit.rollout, 0, GateName::InstallFailures);
    assert_eq!((value.value, value.threshold), (Some(1.0), 1.0));

    let over = first_wave(gates, |sim, cohort| {
        sim.fail_install(&cohort[0], "download");
        sim.fail_install(&cohort[1], "verify");
    });
    let failure = rolled_back_by(&over, GateName::InstallFailures);
    assert_eq!(
        (failure.value, failure.threshold, failure.wave),
        (Some(2.0), 1.0, 0)
    );
    assert_eq!(
        failure.at_ms, T0,
        "decided on the failure, not at the end of the bake"
    );
}

#[test]
fn install_failures_as_a_percentage_count_against_reachable_agents() {
    let gates = Gates {
        max_install_failures: Some(Threshold::Percent(20.0)),
        ..Gates::default()
    };
    let mut one_in_five = first_wave(gates.clone(), |sim, cohort| {
        sim.fail_install(&cohort[0], "stage");
    });
    passes_wave_zero(&mut one_in_five);
    let value = gate(&one_in_five.rollout, 0, GateName::InstallFailures);
    assert_eq!((value.value, value.basis), (Some(20.0), 5));

    let two_in_five = first_wave(gates, |sim, cohort| {
        sim.fail_install(&cohort[0], "stage");
        sim.fail_install(&cohort[1], "stage");
    });
    let failure = rolled_back_by(&two_in_five, GateName::InstallFailures);
    assert_eq!(
        (failure.value, failure.threshold, failure.basis),
        (Some(40.0), 20.0, 5)
    );
}

#[test]
fn a_self_test_failure_fails_the_wave_under_the_default_gate() {
    let sim = first_wave(Gates::default(), |sim, cohort| {
        sim.fail_self_test(&cohort[2]);
    });
    let failure = rolled_back_by(&sim, GateName::SelfTestFailures);
    assert_eq!((failure.value, failure.threshold), (Some(1.0), 0.0));
    assert!(matches!(
        sim.phase(&sim.cohort(0)[2]),
        AgentPhase::RollingBack { .. }
    ));

    // The agent's install_failed in the self_test stage counts as a self-test failure too.
    let via_stage = first_wave(Gates::default(), |sim, cohort| {
        sim.fail_install(&cohort[2], "self_test");
    });
    rolled_back_by(&via_stage, GateName::SelfTestFailures);
}

#[test]
fn self_test_failures_within_the_limit_let_the_wave_pass() {
    let gates = Gates {
        max_self_test_failures: Some(Threshold::Count(1)),
        max_install_failures: None,
        ..Gates::default()
    };
    let mut sim = first_wave(gates, |sim, cohort| {
        sim.fail_self_test(&cohort[2]);
    });
    passes_wave_zero(&mut sim);
    assert!(matches!(
        sim.phase(&sim.cohort(0)[2]),
        AgentPhase::SelfTestFailed { .. }
    ));
}

/// Wave 0 of two agents serving `requests` with `errors` at `latency_ms` each.
fn serving_wave(gates: Gates, errors: u64, latency_ms: f64) -> Sim {
    let fleet = fleet(4);
    let mut spec = spec(&[(WaveSize::Count(2), 60), (WaveSize::Percent(100.0), 60)]);
    spec.gates = gates;
    let mut sim = Sim::new(plan("r-metrics", spec, &fleet), &fleet);
    // Both versions' history: every agent served the old version at 9 ms before the rollout.
    for target in &fleet {
        sim.serve(&target.agent, 1000, 0, 9.0);
    }
    sim.start();
    for agent in sim.cohort(0) {
        sim.install(&agent);
        sim.serve(&agent, 100, errors, latency_ms);
    }
    sim.after(60);
    sim
}

#[test]
fn error_rate_above_the_limit_fails_at_the_end_of_the_bake() {
    let gates = Gates {
        max_error_rate: Some(0.05),
        ..Gates::default()
    };
    let healthy = serving_wave(gates.clone(), 2, 4.0);
    let value = gate(&healthy.rollout, 0, GateName::ErrorRate);
    assert_eq!(
        (value.value, value.basis, value.passed),
        (Some(0.02), 200, true)
    );
    assert_eq!(wave_state(&healthy.rollout).map(|w| w.0), Some(1));

    let failing = serving_wave(gates, 10, 4.0);
    let failure = rolled_back_by(&failing, GateName::ErrorRate);
    assert_eq!((failure.value, failure.threshold), (Some(0.1), 0.05));
    assert_eq!(failure.at_ms, failing.now, "decided when the bake ended");
}

#[test]
fn absolute_p99_above_the_limit_fails_the_wave() {
    let gates = Gates {
        max_p99_ms: Some(50.0),
        ..Gates::default()
    };
    let fast = serving_wave(gates.clone(), 0, 4.0);
    assert!(gate(&fast.rollout, 0, GateName::P99Ms).passed);

    let slow = serving_wave(gates, 0, 80.0);
    let failure = rolled_back_by(&slow, GateName::P99Ms);
    let p99 = failure.value.unwrap();
    assert!((50.0..=100.0).contains(&p99), "{p99}");
}

#[test]
fn p99_relative_to_the_previous_version_on_the_same_agents_gates_the_wave() {
    let gates = Gates {
        max_p99_ratio: Some(1.5),
        ..Gates::default()
    };
    let similar = serving_wave(gates.clone(), 0, 9.5);
    let ratio = gate(&similar.rollout, 0, GateName::P99Ratio);
    assert!(ratio.passed, "{ratio:?}");
    assert!(ratio.value.unwrap() < 1.5);

    let slower = serving_wave(gates, 0, 40.0);
    let failure = rolled_back_by(&slower, GateName::P99Ratio);
    assert!(failure.value.unwrap() > 2.5, "{failure:?}");

    let comparison = slower.rollout.comparison(0).unwrap();
    assert_eq!((comparison.new.agents, comparison.previous.agents), (2, 2));
    assert_eq!(
        (comparison.new.requests, comparison.previous.requests),
        (200, 2000)
    );
    assert!(comparison.new.p99_ms.unwrap() > comparison.previous.p99_ms.unwrap());
}

#[test]
fn a_wave_waits_for_reports_past_its_bake_and_times_out_when_they_never_come() {
    let fleet = fleet(4);
    let rollout = plan(
        "r-reporting",
        spec(&[(WaveSize::Count(2), 60), (WaveSize::Percent(100.0), 60)]),
        &fleet,
    );
    let mut sim = Sim::new(rollout, &fleet);
    sim.start();
    let [talker, silent] = [sim.cohort(0)[0].clone(), sim.cohort(0)[1].clone()];
    sim.install(&talker);
    sim.serve(&talker, 100, 0, 4.0);
    sim.after(10);
    sim.install(&silent); // active, but never sends a heartbeat
    assert_eq!(wave_state(&sim.rollout), Some((0, WaveStage::Baking)));

    sim.after(60);
    assert_eq!(
        wave_state(&sim.rollout),
        Some((0, WaveStage::Baking)),
        "bake over, reports missing"
    );
    let reporting = gate(&sim.rollout, 0, GateName::Reporting);
    assert_eq!((reporting.value, reporting.passed), (Some(0.5), false));

    let mut late_reporter = Sim {
        rollout: sim.rollout.clone(),
        now: sim.now,
        serving: sim.serving.clone(),
        served: sim.served.clone(),
        log: Vec::new(),
    };
    late_reporter.after(100);
    late_reporter.serve(&silent, 10, 0, 4.0);
    assert_eq!(
        wave_state(&late_reporter.rollout).map(|w| w.0),
        Some(1),
        "passes once it reports"
    );

    // Otherwise the wave fails at start + install timeout + bake.
    sim.after(300 - 10 - 60 + 60 - 1);
    assert_eq!(wave_state(&sim.rollout), Some((0, WaveStage::Baking)));
    sim.after(1);
    assert_eq!(sim.now, T0 + 360_000);
    let failure = rolled_back_by(&sim, GateName::Reporting);
    assert_eq!(
        (failure.value, failure.threshold, failure.basis),
        (Some(0.5), 1.0, 2)
    );
}

#[test]
fn min_reporting_below_one_lets_a_wave_pass_without_every_report() {
    let fleet = fleet(4);
    let mut spec = spec(&[(WaveSize::Count(2), 60), (WaveSize::Percent(100.0), 60)]);
    spec.gates.min_reporting = 0.5;
    let mut sim = Sim::new(plan("r-half", spec, &fleet), &fleet);
    sim.start();
    let cohort = sim.cohort(0);
    sim.install(&cohort[0]);
    sim.serve(&cohort[0], 100, 0, 4.0);
    // The other never answers: the install stage runs to its timeout, then the bake.
    sim.after(300);
    assert_eq!(wave_state(&sim.rollout), Some((0, WaveStage::Baking)));
    sim.after(60);
    assert_eq!(wave_state(&sim.rollout).map(|w| w.0), Some(1));
}

#[test]
fn breach_rolls_back_exactly_the_updated_agents_to_their_own_previous_versions() {
    let mut fleet = fleet(6);
    let previous = [Some(release("1.0.0")), Some(release("1.1.0")), None];
    for (i, target) in fleet.iter_mut().enumerate() {
        target.running = previous[i % 3].clone();
    }
    let waves = [
        (WaveSize::Count(2), 60),
        (WaveSize::Count(2), 60),
        (WaveSize::Percent(100.0), 60),
    ];
    let mut sim = Sim::new(plan("r-revert", spec(&waves), &fleet), &fleet);
    sim.start();
    sim.healthy(0);
    sim.after(60);
    let second = sim.cohort(1);
    sim.install(&second[0]);
    sim.serve(&second[0], 100, 0, 4.0);
    let breach = sim.fail_self_test(&second[1]);

    let updated: Vec<String> = sim.cohort(0).into_iter().chain(second.clone()).collect();
    let expected: BTreeMap<String, Option<String>> = fleet
        .iter()
        .filter(|t| updated.contains(&t.agent))
        .map(|t| {
            (
                t.agent.clone(),
                t.running.as_ref().map(|b| b.version.clone()),
            )
        })
        .collect();
    assert_eq!(desired(&breach), expected);
    let distinct: BTreeSet<&Option<String>> = expected.values().collect();
    assert!(
        distinct.len() >= 2,
        "the fleet mixes previous versions: {expected:?}"
    );
    for agent in sim.cohort(2) {
        assert_eq!(
            sim.phase(&agent),
            AgentPhase::Waiting,
            "{agent} was never touched"
        );
    }
    rolled_back_by(&sim, GateName::SelfTestFailures);

    // Agents that ran nothing have nothing to confirm; the others report their old version.
    for agent in &updated {
        let target = fleet.iter().find(|t| &t.agent == agent).unwrap();
        match &target.running {
            None => assert!(matches!(sim.phase(agent), AgentPhase::RolledBack { .. })),
            Some(old) => {
                assert!(matches!(sim.phase(agent), AgentPhase::RollingBack { .. }));
                sim.revert_to(agent, Some(old.clone()));
            }
        }
    }
    assert!(matches!(
        sim.rollout.state(),
        RolloutState::RolledBack { .. }
    ));
    assert_eq!(sim.rollout.stragglers().count(), 0);
    assert!(events(&sim.log).iter().any(|e| matches!(
        e,
        RolloutEvent::RolledBack { confirmed: 4, stragglers, .. } if stragglers.is_empty()
    )));
}

#[test]
fn rollback_ends_after_its_timeout_and_names_the_stragglers() {
    let fleet = fleet(2);
    let mut sim = Sim::new(
        plan("r-stall", spec(&[(WaveSize::Percent(100.0), 600)]), &fleet),
        &fleet,
    );
    sim.start();
    sim.healthy(0);
    let [quick, stuck] = [agent_name(0), agent_name(1)];

    let actions = sim
        .rollout
        .rollback(sim.now, "operator saw bad boxes")
        .unwrap();
    assert_eq!(desired(&actions).len(), 2);
    sim.revert_to(&quick, Some(old_version()));
    assert!(matches!(
        sim.rollout.state(),
        RolloutState::RollingBack { .. }
    ));

    sim.after(299);
    assert!(matches!(
        sim.rollout.state(),
        RolloutState::RollingBack { .. }
    ));
    sim.after(1);
    assert!(matches!(
        sim.rollout.state(),
        RolloutState::RolledBack { cause: RollbackCause::Operator { reason }, .. } if reason == "operator saw bad boxes"
    ));
    assert_eq!(
        sim.rollout.stragglers().collect::<Vec<_>>(),
        vec![stuck.as_str()]
    );

    // When the straggler finally reverts, its record catches up.
    sim.revert_to(&stuck, Some(old_version()));
    assert_eq!(sim.rollout.stragglers().count(), 0);
}

#[test]
fn pause_on_failure_stops_before_the_next_wave_and_resume_overrides_it() {
    let fleet = fleet(6);
    let mut spec = spec(&[(WaveSize::Count(3), 60), (WaveSize::Percent(100.0), 60)]);
    spec.on_failure = OnFailure::Pause;
    let mut sim = Sim::new(plan("r-pause", spec, &fleet), &fleet);
    sim.start();
    let cohort = sim.cohort(0);
    let failing = sim.fail_self_test(&cohort[0]);
    assert!(desired(&failing).is_empty(), "pausing sends nothing");
    let RolloutState::Paused {
        failure: Some(failure),
        index: 0,
        ..
    } = sim.rollout.state().clone()
    else {
        panic!("expected a pause, got {:?}", sim.rollout.state());
    };
    assert_eq!(failure.gate, GateName::SelfTestFailures);
    assert!(sim.rollout.is_active());

    assert!(
        desired(&sim.after(3600)).is_empty(),
        "nothing moves while paused"
    );
    let resumed = sim.rollout.resume(sim.now).unwrap();
    assert_eq!(desired(&resumed), new_versions_for(&sim.cohort(1)));
    assert!(matches!(
        sim.rollout.waves()[0].outcome,
        Some(WaveOutcome::Overridden { .. })
    ));
    assert_eq!(
        sim.rollout.failure().map(|f| f.gate),
        Some(GateName::SelfTestFailures)
    );
}

#[test]
fn operator_pause_stops_the_bake_clock_until_resume() {
    let fleet = fleet(4);
    let waves = [(WaveSize::Count(2), 60), (WaveSize::Percent(100.0), 60)];
    let mut sim = Sim::new(plan("r-hold", spec(&waves), &fleet), &fleet);
    sim.start();
    sim.healthy(0);
    let bake_started = sim.now;
    sim.after(30);
    let paused = sim.rollout.pause(sim.now, "holiday freeze").unwrap();
    assert!(desired(&paused).is_empty());
    assert!(
        sim.rollout.pause(sim.now, "again").is_err(),
        "already paused"
    );

    sim.after(570);
    assert!(matches!(
        sim.rollout.state(),
        RolloutState::Paused { failure: None, .. }
    ));
    let resumed = sim.rollout.resume(sim.now).unwrap();
    assert!(desired(&resumed).is_empty(), "the wave carries on");
    assert_eq!(
        sim.rollout.waves()[0].bake_ends_ms,
        Some(bake_started + 630_000)
    );

    sim.after(29);
    assert_eq!(wave_state(&sim.rollout), Some((0, WaveStage::Baking)));
    sim.after(1);
    assert_eq!(wave_state(&sim.rollout).map(|w| w.0), Some(1));
}

#[test]
fn abort_stops_where_it_is_without_sending_anything() {
    let fleet = fleet(6);
    let waves = [(WaveSize::Count(2), 60), (WaveSize::Percent(100.0), 60)];
    let mut sim = Sim::new(plan("r-abort", spec(&waves), &fleet), &fleet);
    sim.start();
    let cohort = sim.cohort(0);
    sim.install(&cohort[0]);
    sim.presence(&cohort[1], false);

    let aborted = sim.rollout.abort(sim.now, "wrong bundle").unwrap();
    assert!(desired(&aborted).is_empty());
    assert!(matches!(
        sim.rollout.state(),
        RolloutState::Aborted { index: Some(0), .. }
    ));
    assert!(!sim.rollout.is_active());

    let before = sim.log.len();
    sim.presence(&cohort[1], true);
    sim.fail_self_test(&cohort[0]);
    sim.after(100_000);
    assert!(
        desired(&sim.log[before..]).is_empty(),
        "an aborted rollout never sends"
    );
    assert!(sim.rollout.abort(sim.now, "twice").is_err());
    assert!(sim.rollout.resume(sim.now).is_err());

    // Aborting reverts nothing; an explicit rollback afterwards still can.
    let reverted = sim.rollout.rollback(sim.now, "revert after all").unwrap();
    let mut expected = cohort.clone();
    expected.sort();
    assert_eq!(
        desired(&reverted).keys().cloned().collect::<Vec<_>>(),
        expected
    );
}

#[test]
fn abort_interrupts_a_rollback_in_progress() {
    let fleet = fleet(2);
    let mut sim = Sim::new(
        plan(
            "r-abort-rb",
            spec(&[(WaveSize::Percent(100.0), 60)]),
            &fleet,
        ),
        &fleet,
    );
    sim.start();
    sim.fail_self_test(&agent_name(0));
    assert!(matches!(
        sim.rollout.state(),
        RolloutState::RollingBack { .. }
    ));
    let aborted = sim.rollout.abort(sim.now, "stop waiting").unwrap();
    assert!(desired(&aborted).is_empty());
    assert!(matches!(
        sim.rollout.state(),
        RolloutState::Aborted { index: None, .. }
    ));
}

/// Five agents in wave 0 of eight; the first two of its cohort go offline before the start.
fn wave_with_offline_agents() -> (Sim, Vec<String>) {
    let fleet = fleet(8);
    let mut spec = spec(&[(WaveSize::Count(5), 60), (WaveSize::Percent(100.0), 60)]);
    spec.gates.max_install_failures = Some(Threshold::Percent(40.0));
    let mut sim = Sim::new(plan("r-offline", spec, &fleet), &fleet);
    let cohort = sim.cohort(0);
    sim.presence(&cohort[0], false);
    sim.presence(&cohort[1], false);
    (sim, cohort)
}

#[test]
fn offline_agents_stay_out_of_denominators_and_get_the_version_when_they_return() {
    let (mut sim, cohort) = wave_with_offline_agents();
    let started = sim.start();
    assert_eq!(desired(&started), new_versions_for(&cohort[2..]));
    assert!(matches!(
        sim.phase(&cohort[0]),
        AgentPhase::Unreachable { .. }
    ));

    sim.fail_install(&cohort[2], "download");
    sim.install(&cohort[3]);
    sim.serve(&cohort[3], 100, 0, 4.0);
    sim.install(&cohort[4]);
    sim.serve(&cohort[4], 100, 0, 4.0);
    let failures = gate(&sim.rollout, 0, GateName::InstallFailures);
    assert_eq!(
        (failures.value, failures.basis),
        (Some(100.0 / 3.0), 3),
        "1 of 3 reachable"
    );
    assert_eq!(wave_state(&sim.rollout), Some((0, WaveStage::Baking)));

    // Back during the bake: sent the version at once, but it does not hold the wave up.
    sim.after(20);
    let returned = sim.presence(&cohort[0], true);
    assert_eq!(desired(&returned), new_versions_for(&cohort[..1]));
    sim.after(40);
    assert_eq!(wave_state(&sim.rollout).map(|w| w.0), Some(1));
    assert_eq!(gate(&sim.rollout, 0, GateName::Reporting).basis, 3);
}

#[test]
fn an_agent_that_missed_its_wave_joins_the_current_one_on_return() {
    let (mut sim, cohort) = wave_with_offline_agents();
    sim.start();
    sim.healthy(0);
    sim.after(60);
    assert_eq!(wave_state(&sim.rollout), Some((1, WaveStage::Installing)));

    let returned = sim.presence(&cohort[1], true);
    assert_eq!(desired(&returned), new_versions_for(&cohort[1..2]));
    assert_eq!(sim.rollout.agent(&cohort[1]).unwrap().wave, 1);
    assert_eq!(sim.rollout.waves()[1].joined, vec![cohort[1].clone()]);

    sim.healthy(1);
    assert_eq!(
        wave_state(&sim.rollout),
        Some((1, WaveStage::Installing)),
        "wave 1 now waits for the returned agent too"
    );
    sim.install(&cohort[1]);
    sim.serve(&cohort[1], 100, 0, 4.0);
    assert_eq!(wave_state(&sim.rollout), Some((1, WaveStage::Baking)));
    assert_eq!(gate(&sim.rollout, 1, GateName::Reporting).basis, 4);
}

#[test]
fn agents_still_offline_when_the_rollout_completes_are_sent_the_new_version() {
    let fleet = fleet(3);
    let mut sim = Sim::new(
        plan(
            "r-straggler",
            spec(&[(WaveSize::Percent(100.0), 0)]),
            &fleet,
        ),
        &fleet,
    );
    let away = agent_name(1);
    sim.presence(&away, false);
    let started = sim.start();
    assert_eq!(desired(&started).len(), 2);
    sim.healthy(0);
    assert!(matches!(
        sim.rollout.state(),
        RolloutState::Completed { .. }
    ));
    assert_eq!(
        desired(&sim.log).get(&away),
        Some(&Some("2.0.0".to_owned()))
    );
    assert!(events(&sim.log)
        .iter()
        .any(|e| matches!(e, RolloutEvent::Completed { stragglers: 1, .. })));
}

#[test]
fn dropping_offline_after_receiving_the_version_counts_against_the_dropped_gate() {
    let gates = Gates {
        max_dropped: Some(Threshold::Count(0)),
        ..Gates::default()
    };
    let sim = first_wave(gates, |sim, cohort| {
        sim.presence(&cohort[0], false);
    });
    let failure = rolled_back_by(&sim, GateName::Dropped);
    assert_eq!((failure.value, failure.basis), (Some(1.0), 5));

    // Without the gate the drop only leaves the agent out of the denominators.
    let mut ungated = first_wave(Gates::default(), |sim, cohort| {
        sim.presence(&cohort[0], false);
    });
    assert!(matches!(
        ungated.phase(&ungated.cohort(0)[0]),
        AgentPhase::Unreachable { .. }
    ));
    passes_wave_zero(&mut ungated);
    assert_eq!(gate(&ungated.rollout, 0, GateName::Reporting).basis, 4);
}

#[test]
fn activation_is_seen_in_heartbeats_when_the_event_is_lost() {
    let fleet = fleet(2);
    let mut sim = Sim::new(
        plan("r-hb", spec(&[(WaveSize::Percent(100.0), 60)]), &fleet),
        &fleet,
    );
    sim.start();
    let agent = agent_name(0);
    sim.serving.insert(agent.clone(), Some(new_version()));
    sim.serve(&agent, 10, 0, 4.0);
    assert!(matches!(sim.phase(&agent), AgentPhase::Active { .. }));
    assert!(sim.rollout.agent(&agent).unwrap().reported_ms.is_some());
}

#[test]
fn an_agent_that_stops_serving_the_new_version_counts_as_a_failed_install() {
    let fleet = fleet(4);
    let mut spec = spec(&[(WaveSize::Count(2), 60), (WaveSize::Percent(100.0), 60)]);
    spec.gates.max_install_failures = Some(Threshold::Count(0));
    let mut sim = Sim::new(plan("r-revert-silent", spec, &fleet), &fleet);
    sim.start();
    sim.healthy(0);
    let agent = sim.cohort(0)[0].clone();
    sim.revert_to(&agent, Some(old_version()));
    assert!(matches!(
        sim.phase(&agent),
        AgentPhase::RollingBack { .. } | AgentPhase::RolledBack { .. }
    ));
    let failure = rolled_back_by(&sim, GateName::InstallFailures);
    assert_eq!(failure.value, Some(1.0));
}

#[test]
fn events_of_other_rollouts_and_other_bundles_are_ignored() {
    let fleet = fleet(2);
    let mut sim = Sim::new(
        plan("r-mine", spec(&[(WaveSize::Percent(100.0), 60)]), &fleet),
        &fleet,
    );
    sim.start();
    let agent = agent_name(0);
    let foreign = Event {
        session: 1,
        rollout: Some("r-other".into()),
        digest: Some(new_version().digest),
        kind: EventKind::SelfTestFailed {
            reason: "not ours".into(),
        },
    };
    sim.rollout.on_event(&agent, &foreign, sim.now);
    sim.event(
        &agent,
        &release("9.9.9"),
        EventKind::SelfTestFailed {
            reason: "other bundle".into(),
        },
    );
    sim.rollout.on_event("stranger", &foreign, sim.now);
    assert!(matches!(sim.phase(&agent), AgentPhase::Assigned { .. }));
    assert_eq!(wave_state(&sim.rollout), Some((0, WaveStage::Installing)));
}

#[test]
fn rollback_after_completion_reverts_every_updated_agent() {
    let fleet = fleet(3);
    let mut sim = Sim::new(
        plan(
            "r-late-revert",
            spec(&[(WaveSize::Percent(100.0), 0)]),
            &fleet,
        ),
        &fleet,
    );
    sim.start();
    sim.healthy(0);
    assert!(matches!(
        sim.rollout.state(),
        RolloutState::Completed { .. }
    ));
    let reverted = sim.rollout.rollback(sim.now, "customer complaint").unwrap();
    assert_eq!(desired(&reverted).len(), 3);
    assert!(desired(&reverted)
        .values()
        .all(|v| v.as_deref() == Some("1.0.0")));
    assert!(
        sim.rollout.rollback(sim.now, "twice").is_err(),
        "already rolling back"
    );
}

#[test]
fn a_restored_rollout_continues_exactly_like_the_original() {
    let fleet = fleet(8);
    let mut spec = spec(&[
        (WaveSize::Count(3), 60),
        (WaveSize::Percent(50.0), 60),
        (WaveSize::Percent(100.0), 60),
    ]);
    spec.gates.max_error_rate = Some(0.05);
    spec.gates.max_p99_ratio = Some(3.0);
    let mut sim = Sim::new(plan("r-restart", spec, &fleet), &fleet);
    for target in &fleet {
        sim.serve(&target.agent, 50, 1, 7.0);
    }
    sim.start();
    let cohort = sim.cohort(0);
    sim.install(&cohort[0]);
    sim.serve(&cohort[0], 100, 1, 6.0);
    sim.presence(&cohort[1], false);
    sim.install(&cohort[2]);
    sim.after(20);
    // Mid-bake of wave 0, one agent offline, one active without a heartbeat yet.
    assert_eq!(wave_state(&sim.rollout), Some((0, WaveStage::Baking)));

    let cbor = serde_cbor::to_vec(&sim.rollout).unwrap();
    let from_cbor: Rollout = serde_cbor::from_slice(&cbor).unwrap();
    assert_eq!(from_cbor, sim.rollout);
    let json = serde_json::to_string(&sim.rollout).unwrap();
    let from_json: Rollout = serde_json::from_str(&json).unwrap();
    assert_eq!(serde_json::to_string(&from_json).unwrap(), json);

    let script = |sim: &mut Sim| {
        let cohort = sim.cohort(0);
        sim.serve(&cohort[2], 80, 0, 5.0);
        sim.after(40);
        sim.presence(&cohort[1], true);
        sim.install(&cohort[1]);
        sim.serve(&cohort[1], 30, 0, 5.0);
        sim.healthy(1);
        sim.after(60);
        sim.healthy(2);
        sim.after(60);
        sim.log.clone()
    };
    let mut restored = Sim {
        rollout: from_cbor,
        now: sim.now,
        serving: sim.serving.clone(),
        served: sim.served.clone(),
        log: Vec::new(),
    };
    sim.log.clear();
    let original = script(&mut sim);
    let resumed = script(&mut restored);
    assert_eq!(original, resumed);
    assert_eq!(sim.rollout, restored.rollout);
    assert!(
        matches!(restored.rollout.state(), RolloutState::Completed { .. }),
        "{:?}",
        restored.rollout.state()
    );
    assert_eq!(
        restored.rollout.agent(&cohort[1]).unwrap().wave,
        1,
        "joined wave 1 on return"
    );
}

#[test]
fn cohorts_are_deterministic_per_rollout_id() {
    let fleet = fleet(30);
    let waves = [(WaveSize::Count(3), 60), (WaveSize::Percent(100.0), 60)];
    let a = plan("r-seed", spec(&waves), &fleet);
    let mut shuffled = fleet.clone();
    shuffled.reverse();
    let b = plan("r-seed", spec(&waves), &shuffled);
    let c = plan("r-other-seed", spec(&waves), &fleet);
    assert_eq!(a.waves(), b.waves());
    assert_ne!(a.waves()[0].cohort, c.waves()[0].cohort);
}

#[test]
fn stratified_rollouts_sample_every_label_value_in_every_wave() {
    let mut fleet = fleet(20);
    for (i, target) in fleet.iter_mut().enumerate() {
        let hw = match i {
            0..=10 => "orin",
            11..=16 => "xavier",
            _ => "nano",
        };
        target.labels.insert("hw".into(), hw.into());
    }
    let mut spec = spec(&[
        (WaveSize::Count(3), 60),
        (WaveSize::Percent(50.0), 60),
        (WaveSize::Percent(100.0), 60),
    ]);
    spec.stratify_by = Some("hw".into());
    let rollout = plan("r-strata", spec, &fleet);
    for wave in rollout.waves() {
        let strata: BTreeSet<&str> = wave
            .cohort
            .iter()
            .map(|a| rollout.agent(a).unwrap().stratum.as_deref().unwrap())
            .collect();
        assert_eq!(strata.len(), 3, "wave {} has {strata:?}", wave.index);
    }
}

#[test]
fn overlapping_active_rollouts_are_refused_with_the_agents_named() {
    let fleet = fleet(4);
    let waves = [(WaveSize::Percent(100.0), 0)];
    let mut first = plan("r-first", spec(&waves), &fleet[..2]);
    let second = plan("r-second", spec(&waves), &fleet[1..]);

    let err = check_overlap([&first], second.targets()).unwrap_err();
    assert!(
        matches!(&err, RolloutError::CheckOverlap { rollout, agents }
        if rollout == "r-first" && agents == &vec![agent_name(1)])
    );
    assert_eq!(
        err.to_string(),
        "check overlap: rollout r-first is active on edge-01"
    );

    first.abort(T0, "make room").unwrap();
    assert!(
        check_overlap([&first], second.targets()).is_ok(),
        "ended rollouts hold nothing"
    );
}

#[test]
fn creation_refuses_mismatched_bundles_and_empty_selections() {
    let fleet = fleet(4);
    let waves = [(WaveSize::Percent(100.0), 0)];

    let mismatch = Rollout::new("r-x", spec(&waves), release("3.0.0"), &fleet, T0).unwrap_err();
    assert!(
        matches!(mismatch, RolloutError::ResolveBundle { .. }),
        "{mismatch}"
    );

    let mut nobody = spec(&waves);
    nobody.selector = "hw=nano".parse().unwrap();
    let empty = Rollout::new("r-x", nobody, new_version(), &fleet, T0).unwrap_err();
    assert!(
        matches!(
            empty,
            RolloutError::SelectTargets {
                already_running: 0,
                ..
            }
        ),
        "{empty}"
    );

    let mut done = fleet.clone();
    for target in &mut done {
        target.running = Some(new_version());
    }
    let current = Rollout::new("r-x", spec(&waves), new_version(), &done, T0).unwrap_err();
    assert!(matches!(
        current,
        RolloutError::SelectTargets {
            already_running: 4,
            ..
        }
    ));

    let bad_id = Rollout::new("r/x", spec(&waves), new_version(), &fleet, T0).unwrap_err();
    assert!(matches!(bad_id, RolloutError::CheckId { .. }));
}

#[test]
fn selector_and_current_agents_shape_the_targets() {
    let mut fleet = fleet(6);
    fleet[0].running = Some(new_version());
    let mut orin_only = spec(&[(WaveSize::Percent(100.0), 0)]);
    orin_only.selector = "hw=orin".parse().unwrap();
    let rollout = plan("r-orin", orin_only, &fleet);
    assert_eq!(rollout.skipped(), &[agent_name(0)]);
    let targets: Vec<&str> = rollout.targets().collect();
    assert_eq!(targets, vec!["edge-02", "edge-04"]);
}

#[test]
fn previous_version_follows_heartbeats_until_the_agent_is_updated() {
    let fleet = fleet(4);
    let waves = [(WaveSize::Count(2), 60), (WaveSize::Percent(100.0), 60)];
    let mut sim = Sim::new(plan("r-prev", spec(&waves), &fleet), &fleet);
    let later = sim.cohort(1)[0].clone();
    sim.revert_to(&later, Some(release("1.2.0")));
    assert_eq!(
        sim.rollout.agent(&later).unwrap().previous,
        Some(release("1.2.0")),
        "an agent upgraded by hand before its wave returns to what it really ran"
    );
}
