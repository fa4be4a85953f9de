//! `flotilla rollout ...`: start, list, inspect and steer staged rollouts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use flotilla_shared::wire::DesiredBundle;
use serde::Deserialize;
use serde_json::json;

use super::table::{self, Table};
use super::{emit, print_json, Client, RemoteArgs};
use crate::rollout::{
    BundleRef, Comparison, GateFailure, GateName, GateValue, Gates, OnFailure, RollbackCause,
    RolloutSpec, RolloutState, Selector, Threshold, VersionSummary, WaveOutcome, WaveSize,
    WaveSpec, DEFAULT_INSTALL_TIMEOUT_SECS,
};

/// `flotilla rollout start`: a spec from a file, or built from flags.
#[derive(Debug, Clone, Args)]
pub struct StartArgs {
    /// Rollout spec file, TOML (`.toml`) or JSON (`.json`), instead of the flags below.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "bundle", "selector", "waves", "bake", "max_p99_ratio", "max_p99_ms", "max_error_rate",
        "on_failure", "stratify_by", "install_timeout",
    ])]
    pub spec: Option<PathBuf>,
    /// Bundle to roll out: `name@version` or a digest (`sha256:` prefix optional).
    #[arg(long, value_name = "NAME@VERSION|DIGEST", required_unless_present = "spec",
        value_parser = parse_bundle_ref)]
    pub bundle: Option<BundleRef>,
    /// Agents taking part, as a label selector (`site=berlin,hw in (cpu,gpu)`); `''`
    /// selects every agent.
    #[arg(long, value_name = "EXPR", required_unless_present = "spec",
        value_parser = parse_selector)]
    pub selector: Option<Selector>,
    /// One wave's size, as agents (`5`) or a percentage of the targets (`25%`); repeat in
    /// order (`--wave 1 --wave 50% --wave 100%`). Sizes are per wave; the last takes the rest.
    #[arg(long = "wave", value_name = "N|P%", required_unless_present = "spec",
        value_parser = parse_wave_size)]
    pub waves: Vec<WaveSize>,
    /// Bake time of every wave, e.g. `30s` or `10m`.
    #[arg(long, value_name = "DURATION", required_unless_present = "spec",
        value_parser = parse_whole_seconds)]
    pub bake: Option<u64>,
    /// Fail a wave whose new version's p99 exceeds the previous version's by this factor on
    /// the same agents [default: not gated].
    #[arg(long, value_name = "F")]
    pub max_p99_ratio: Option<f64>,
    /// Fail a wave whose new version's p99 exceeds this many milliseconds [default: not
    /// gated].
    #[arg(long, value_name = "MS")]
    pub max_p99_ms: Option<f64>,
    /// Fail a wave whose new version's error rate (0-1) exceeds this [default: not gated].
    #[arg(long, value_name = "F")]
    pub max_error_rate: Option<f64>,
    /// What a failed gate leads to: `rollback` or `pause` [default: rollback].
    #[arg(long, value_name = "ACTION", value_parser = parse_on_failure)]
    pub on_failure: Option<OnFailure>,
    /// Label key whose values every wave samples proportionally [default: none].
    #[arg(long, value_name = "LABEL")]
    pub stratify_by: Option<String>,
    /// How long a wave's agents get to install before the bake starts regardless
    /// [default: 5m].
    #[arg(long, value_name = "DURATION", value_parser = parse_whole_seconds)]
    pub install_timeout: Option<u64>,
    /// Rollout id [default: NAME-VERSION-N, chosen by the server].
    #[arg(long)]
    pub id: Option<String>,
    /// Print the created rollout as the API's JSON.
    #[arg(long)]
    pub json: bool,
    /// Server and token.
    #[command(flatten)]
    pub remote: RemoteArgs,
}

impl StartArgs {
    /// The spec to send, checked here so a mistake is named before anything is sent.
    fn spec(&self) -> Result<RolloutSpec> {
        if let Some(path) = &self.spec {
            return read_spec(path);
        }

        // clap enforces these without --spec; the errors only guard against a change there.
        let bundle = self
            .bundle
            .clone()
            .context("--bundle is required without --spec")?;
        let selector = self
            .selector
            .clone()
            .context("--selector is required without --spec")?;
        let bake_secs = self.bake.context("--bake is required without --spec")?;
        let gates = Gates {
            max_p99_ratio: self.max_p99_ratio,
            max_p99_ms: self.max_p99_ms,
            max_error_rate: self.max_error_rate,
            ..Gates::default()
        };
        let spec = RolloutSpec {
            bundle,
            selector,
            waves: self
                .waves
                .iter()
                .map(|&size| WaveSpec { size, bake_secs })
                .collect(),
            gates,
            on_failure: self.on_failure.unwrap_or_default(),
            install_timeout_secs: self.install_timeout.unwrap_or(DEFAULT_INSTALL_TIMEOUT_SECS),
            stratify_by: self.stratify_by.clone(),
        };
        spec.validate().context("invalid rollout")?;
        Ok(spec)
    }
}

/// Reads and validates a spec file: JSON when it ends in `.json`, TOML when in `.toml`, and
/// otherwise JSON if it starts with `{`.
fn read_spec(path: &Path) -> Result<RolloutSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read rollout spec {}", path.display()))?;
    let is_json = match path.extension().and_then(|e| e.to_str()) {
        Some("json") => true,
        Some("toml") => false,
        _ => text.trim_start().starts_with('{'),
    };
    let spec = if is_json {
        RolloutSpec::from_json(&text)
    } else {
        RolloutSpec::from_toml(&text)
    };
    spec.with_context(|| format!("invalid rollout spec {}", path.display()))
}

fn parse_bundle_ref(text: &str) -> Result<BundleRef, String> {
    text.parse().map_err(|e| format!("{e}"))
}

fn parse_selector(text: &str) -> Result<Selector, String> {
    text.parse().map_err(|e| format!("{e}"))
}

fn parse_wave_size(text: &str) -> Result<WaveSize, String> {
    let text = text.trim();
    if let Some(percent) = text.strip_suffix('%') {
        let p: f64 = percent
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not a percentage (like 25%)"))?;
        return Ok(WaveSize::Percent(p));
    }
    text.parse()
        .map(WaveSize::Count)
        .map_err(|_| format!("{text:?} is neither a number of agents (5) nor a percentage (25%)"))
}

fn parse_whole_seconds(text: &str) -> Result<u64, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration like 30s or 5m: {e}"))?;
    if duration.subsec_nanos() != 0 {
        return Err(format!("{text:?}: use whole seconds"));
    }
    Ok(duration.as_secs())
}

fn parse_on_failure(text: &str) -> Result<OnFailure, String> {
    match text {
        "rollback" => Ok(OnFailure::Rollback),
        "pause" => Ok(OnFailure::Pause),
        other => Err(format!("unknown action {other:?}: rollback or pause")),
    }
}

/// The parts of the API's rollout view the CLI shows.
#[derive(Debug, Deserialize)]
struct RolloutDoc {
    id: String,
    bundle: DesiredBundle,
    created_ms: u64,
    state: String,
    status: RolloutState,
    current_wave: Option<usize>,
    spec: RolloutSpec,
    targets: usize,
    skipped: Vec<String>,
    phases: BTreeMap<String, usize>,
    waves: Vec<WaveDoc>,
    failure: Option<GateFailure>,
}

/// One wave of [`RolloutDoc`].
#[derive(Debug, Deserialize)]
struct WaveDoc {
    index: usize,
    agents: Vec<String>,
    phases: BTreeMap<String, usize>,
    bake_secs: u64,
    started_ms: Option<u64>,
    bake_ends_ms: Option<u64>,
    gates: Vec<GateValue>,
    outcome: Option<WaveOutcome>,
    comparison: Option<Comparison>,
}

/// Sends the spec; prints the created rollout's id, targets and waves.
pub(in crate::cli) fn start(args: &StartArgs) -> Result<()> {
    let spec = args.spec()?;
    let client = Client::new(&args.remote)?;
    let body = serde_json::to_value(&spec).context("cannot encode the rollout spec")?;
    let query: Vec<(&str, String)> = args.id.iter().map(|id| ("id", id.clone())).collect();
    let answer = client.post_json(&["api", "v1", "rollouts"], &query, Some(&body))?;
    if args.json {
        return print_json(&answer.json);
    }

    let doc: RolloutDoc = answer.parse("rollout")?;
    let mut out = format!(
        "started rollout {} of {}@{} (sha256:{}) to {} agent(s)\n",
        doc.id,
        doc.bundle.name,
        doc.bundle.version,
        doc.bundle.digest.short(),
        doc.targets
    );
    if !doc.skipped.is_empty() {
        out.push_str(&format!(
            "skipped {} agent(s) already running it: {}\n",
            doc.skipped.len(),
            doc.skipped.join(", ")
        ));
    }
    let mut waves = Table::new(&["WAVE", "AGENTS", "BAKE"]);
    for wave in &doc.waves {
        waves.row(vec![
            wave.index.to_string(),
            wave.agents.len().to_string(),
            table::coarse(Duration::from_secs(wave.bake_secs)),
        ]);
    }
    out.push_str(&waves.render(""));
    out.push_str(&format!(
        "state {}; follow it with `flotilla rollout status {}`\n",
        describe_state(&doc.status),
        doc.id
    ));
    emit(&out)
}

/// Lists rollouts, newest first.
pub(in crate::cli) fn list(
    active: bool,
    limit: Option<usize>,
    before: Option<String>,
    remote: &RemoteArgs,
    as_json: bool,
) -> Result<()> {
    let client = Client::new(remote)?;
    let mut query = Vec::new();
    if active {
        query.push(("active", "true".to_owned()));
    }
    if let Some(limit) = limit {
        query.push(("limit", limit.to_string()));
    }
    if let Some(before) = before {
        query.push(("before", before));
    }
    let answer = client.get(&["api", "v1", "rollouts"], &query)?;
    if as_json {
        return print_json(&answer.json);
    }

    let docs: Vec<RolloutDoc> = answer.parse("rollout list")?;
    if docs.is_empty() {
        return emit("no rollouts\n");
    }
    let now = table::now_ms();
    let mut out = Table::new(&["ROLLOUT", "BUNDLE", "STATE", "WAVE", "TARGETS", "CREATED"]);
    for doc in &docs {
        out.row(vec![
            doc.id.clone(),
            format!("{}@{}", doc.bundle.name, doc.bundle.version),
            doc.state.clone(),
            doc.current_wave
                .map_or_else(|| "-".into(), |w| format!("{}/{}", w + 1, doc.waves.len())),
            doc.targets.to_string(),
            table::age(doc.created_ms, now),
        ]);
    }
    emit(&out.render(""))
}

/// Shows one rollout: its state, each wave's agents by phase, gate values and the new
/// versus previous comparison, and the failure if there is one.
pub(in crate::cli) fn status(id: &str, remote: &RemoteArgs, as_json: bool) -> Result<()> {
    let client = Client::new(remote)?;
    let answer = client.get(&["api", "v1", "rollouts", id], &[])?;
    if as_json {
        return print_json(&answer.json);
    }
    let doc: RolloutDoc = answer.parse("rollout")?;
    emit(&describe_rollout(&doc, table::now_ms()))
}

/// An operator action on a rollout.
#[derive(Debug, Clone, Copy)]
pub(in crate::cli) enum Steer {
    /// Stop before the next step.
    Pause,
    /// Carry on.
    Resume,
    /// Stop where it is.
    Abort,
    /// Return updated agents to their previous version.
    Rollback,
}

impl Steer {
    fn action(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Abort => "abort",
            Self::Rollback => "rollback",
        }
    }
}

/// Pauses, resumes, aborts or rolls back a rollout; prints its new state.
pub(in crate::cli) fn steer(
    id: &str,
    steer: Steer,
    reason: Option<&str>,
    remote: &RemoteArgs,
    as_json: bool,
) -> Result<()> {
    let client = Client::new(remote)?;
    let body = reason.map(|r| json!({ "reason": r }));
    let answer = client.post_json(
        &["api", "v1", "rollouts", id, steer.action()],
        &[],
        body.as_ref(),
    )?;
    if as_json {
        return print_json(&answer.json);
    }
    let doc: RolloutDoc = answer.parse("rollout")?;
    emit(&format!(
        "rollout {}: {} requested; now {}\n",
        doc.id,
        steer.action(),
        describe_state(&doc.status)
    ))
}

fn describe_state(state: &RolloutState) -> String {
    match state {
        RolloutState::Pending => "pending".into(),
        RolloutState::Wave { index, stage } => format!("wave {index} {}", stage_name(*stage)),
        RolloutState::Paused {
            index,
            stage,
            reason,
            ..
        } => format!("paused in wave {index} ({}): {reason}", stage_name(*stage)),
        RolloutState::Completed { at_ms } => format!("completed at {}", table::timestamp(*at_ms)),
        RolloutState::Aborted { at_ms, reason, .. } => {
            format!("aborted at {}: {reason}", table::timestamp(*at_ms))
        }
        RolloutState::RollingBack {
            until_ms, cause, ..
        } => format!(
            "rolling back ({}), waiting until {}",
            describe_cause(cause),
            table::timestamp(*until_ms)
        ),
        RolloutState::RolledBack { at_ms, cause } => format!(
            "rolled back at {} ({})",
            table::timestamp(*at_ms),
            describe_cause(cause)
        ),
    }
}

fn stage_name(stage: crate::rollout::WaveStage) -> &'static str {
    match stage {
        crate::rollout::WaveStage::Installing => "installing",
        crate::rollout::WaveStage::Baking => "baking",
    }
}

fn describe_cause(cause: &RollbackCause) -> String {
    match cause {
        RollbackCause::Gate(failure) => format!("gate failed: {}", describe_failure(failure)),
        RollbackCause::Operator { reason } => format!("operator: {reason}"),
    }
}

fn describe_failure(f: &GateFailure) -> String {
    format!(
        "wave {} gate {}: {} against limit {} over {}",
        f.wave,
        f.gate.as_str(),
        f.value
            .map_or_else(|| "nothing measured".into(), |v| format!("{v}")),
        f.threshold,
        f.gate.basis_text(f.basis)
    )
}

/// A gate's measured value and limit in its unit, with the comparison that must hold and
/// what the value is taken over.
fn gate_cells(gate: &GateValue, spec: &Gates) -> [String; 3] {
    let unit_of = |t: Option<Threshold>| match t {
        Some(Threshold::Percent(_)) => "%",
        _ => " agents",
    };
    let (unit, decimals, comparison) = match gate.gate {
        GateName::InstallFailures => (unit_of(spec.max_install_failures), 1, "<="),
        GateName::SelfTestFailures => (unit_of(spec.max_self_test_failures), 1, "<="),
        GateName::Dropped => (unit_of(spec.max_dropped), 1, "<="),
        GateName::ErrorRate => ("", 4, "<="),
        GateName::P99Ms => (" ms", 1, "<="),
        GateName::P99Ratio => ("x", 2, "<="),
        GateName::Reporting => ("", 2, ">="),
    };
    let show = |v: f64| {
        if unit == " agents" {
            format!("{v:.0}{unit}")
        } else {
            format!("{v:.decimals$}{unit}")
        }
    };
    [
        gate.value.map_or_else(|| "-".into(), show),
        format!("{comparison} {}", show(gate.threshold)),
        gate.gate.basis_text(gate.basis),
    ]
}

fn describe_rollout(doc: &RolloutDoc, now: u64) -> String {
    let mut out = String::new();
    let mut line = |label: &str, text: String| out.push_str(&format!("{label:<10}{text}\n"));
    line("rollout", doc.id.clone());
    line(
        "bundle",
        format!(
            "{}@{} (sha256:{})",
            doc.bundle.name,
            doc.bundle.version,
            doc.bundle.digest.short()
        ),
    );
    line("state", describe_state(&doc.status));
    line(
        "created",
        format!(
            "{} ({})",
            table::timestamp(doc.created_ms),
            table::age(doc.created_ms, now)
        ),
    );
    let selector = doc.spec.selector.to_string();
    line(
        "selector",
        if selector.is_empty() {
            "(every agent)".into()
        } else {
            selector
        },
    );
    line(
        "targets",
        format!("{} agent(s): {}", doc.targets, phase_list(&doc.phases)),
    );
    if !doc.skipped.is_empty() {
        line(
            "skipped",
            format!(
                "{} already running it: {}",
                doc.skipped.len(),
                doc.skipped.join(", ")
            ),
        );
    }
    let on_failure = match doc.spec.on_failure {
        OnFailure::Rollback => "rollback",
        OnFailure::Pause => "pause",
    };
    line("on fail", on_failure.to_owned());
    if let Some(failure) = &doc.failure {
        line("failure", describe_failure(failure));
    }

    for wave in &doc.waves {
        out.push('\n');
        out.push_str(&describe_wave(wave, &doc.spec.gates, now));
    }
    out
}

fn describe_wave(wave: &WaveDoc, gates: &Gates, now: u64) -> String {
    let progress = match (wave.started_ms, wave.bake_ends_ms, &wave.outcome) {
        (_, _, Some(WaveOutcome::Passed { at_ms })) => {
            format!("passed at {}", table::timestamp(*at_ms))
        }
        (_, _, Some(WaveOutcome::Failed(f))) => format!("failed: {}", describe_failure(f)),
        (_, _, Some(WaveOutcome::Overridden { failure, .. })) => {
            format!("resumed past a failure: {}", describe_failure(failure))
        }
        (None, _, None) => "not started".into(),
        (Some(_), Some(ends), None) if ends > now => format!(
            "baking, gates decide in {}",
            table::coarse(Duration::from_millis(ends - now))
        ),
        (Some(_), Some(_), None) => "bake over, gates deciding".into(),
        (Some(started), None, None) => format!("installing, started {}", table::age(started, now)),
    };
    let mut out = format!(
        "wave {}  {} agent(s), bake {}: {progress}\n",
        wave.index,
        wave.agents.len(),
        table::coarse(Duration::from_secs(wave.bake_secs)),
    );
    if !wave.phases.is_empty() {
        out.push_str(&format!("  agents    {}\n", phase_list(&wave.phases)));
    }

    if !wave.gates.is_empty() {
        let mut table = Table::new(&["GATE", "VALUE", "LIMIT", "OVER", "RESULT"]);
        for gate in &wave.gates {
            let [value, limit, basis] = gate_cells(gate, gates);
            table.row(vec![
                gate.gate.as_str().into(),
                value,
                limit,
                basis,
                if gate.passed { "pass" } else { "FAIL" }.into(),
            ]);
        }
        out.push_str(&table.render("  "));
    }

    if let Some(comparison) = &wave.comparison {
        let mut table = Table::new(&[
            "VERSION",
            "AGENTS",
            "REQUESTS",
            "ERRORS",
            "ERROR RATE",
            "P50 MS",
            "P99 MS",
        ]);
        for (name, summary) in [("new", &comparison.new), ("previous", &comparison.previous)] {
            table.row(summary_cells(name, summary));
        }
        out.push_str(&table.render("  "));
    }
    out
}

fn summary_cells(name: &str, s: &VersionSummary) -> Vec<String> {
    vec![
        name.into(),
        s.agents.to_string(),
        s.requests.to_string(),
        s.errors.to_string(),
        table::figure(s.error_rate, 4),
        table::figure(s.p50_ms, 1),
        table::figure(s.p99_ms, 1),
    ]
}

fn phase_list(phases: &BTreeMap<String, usize>) -> String {
    if phases.is_empty() {
        return "none".into();
    }
    phases
        .iter()
        .map(|(phase, n)| format!("{n} {phase}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wave_sizes_and_durations_parse_or_say_why_not() {
        assert_eq!(parse_wave_size("5"), Ok(WaveSize::Count(5)));
        assert_eq!(parse_wave_size("25%"), Ok(WaveSize::Percent(25.0)));
        assert!(parse_wave_size("half").unwrap_err().contains("neither"));
        assert!(parse_wave_size("x%").unwrap_err().contains("percentage"));
        assert_eq!(parse_whole_seconds("2m"), Ok(120));
        assert!(parse_whole_seconds("1500ms")
            .unwrap_err()
            .contains("whole seconds"));
        assert!(parse_whole_seconds("soon").is_err());
        assert!(parse_on_failure("retry")
            .unwrap_err()
            .contains("rollback or pause"));
    }
}
