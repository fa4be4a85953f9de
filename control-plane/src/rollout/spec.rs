//! What an operator asks for: the rollout spec, its JSON and TOML forms, and its validation.
//!
//! A spec names a bundle, a label selector, the waves with their bake times, the gates every
//! wave must pass and what to do when one fails. Unknown fields are errors in both forms, so a
//! typo can never silently weaken a gate.

use std::fmt;
use std::str::FromStr;

use flotilla_shared::verify::check_model_name;
use flotilla_shared::Sha256Digest;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::selector::{check_label_key, Selector};

/// Default for [`RolloutSpec::install_timeout_secs`]: five minutes.
pub const DEFAULT_INSTALL_TIMEOUT_SECS: u64 = 300;

/// Default for [`Gates::min_reporting`]: every reachable agent of a wave must report.
pub const DEFAULT_MIN_REPORTING: f64 = 1.0;

/// Default for [`Gates::max_install_failures`]: more than 10% of a wave's reachable agents.
pub const DEFAULT_MAX_INSTALL_FAILURES: Threshold = Threshold::Percent(10.0);

/// Default for [`Gates::max_self_test_failures`]: any self-test failure fails the wave.
pub const DEFAULT_MAX_SELF_TEST_FAILURES: Threshold = Threshold::Count(0);

/// A staged rollout of one bundle to the agents a selector matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// The bundle to roll out: `name@version` or a digest (`sha256:` prefix optional). The
    /// server resolves it to a digest, name and version before the engine sees the rollout.
    pub bundle: BundleRef,
    /// Which agents take part, as a label selector; required, and `""` selects every agent.
    pub selector: Selector,
    /// The waves in order; at least one. Sizes are per wave, not cumulative: the percentages
    /// of all waves but the last must add up to less than 100, and the last takes the rest.
    pub waves: Vec<WaveSpec>,
    /// What every wave must show before the next one starts. Default: see [`Gates`].
    #[serde(default)]
    pub gates: Gates,
    /// What happens when a wave fails a gate. Default: roll back.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// How long a wave's agents get to install before the bake starts regardless, in seconds;
    /// a wave times out `install_timeout_secs + bake_secs` after it started, and a rollback
    /// waits this long for agents to confirm the old version. Default 300.
    #[serde(default = "default_install_timeout_secs")]
    pub install_timeout_secs: u64,
    /// Label key whose values every wave samples proportionally (for example `hw`); agents
    /// without the label form a stratum of their own. Default: no stratification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stratify_by: Option<String>,
}

fn default_install_timeout_secs() -> u64 {
    DEFAULT_INSTALL_TIMEOUT_SECS
}

impl RolloutSpec {
    /// Parses a JSON spec (the API form) and validates it.
    pub fn from_json(text: &str) -> Result<Self, SpecError> {
        let spec: Self = serde_json::from_str(text).map_err(SpecError::ParseJson)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses a TOML spec (the CLI form) and validates it.
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        let spec: Self = toml::from_str(text).map_err(SpecError::ParseToml)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks everything that can be checked without knowing the fleet.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.waves.is_empty() {
            return Err(SpecError::CheckWaveList);
        }

        let mut total_percent = 0.0;
        let last = self.waves.len() - 1;
        for (wave, spec) in self.waves.iter().enumerate() {
            match spec.size {
                WaveSize::Count(0) => {
                    return Err(SpecError::CheckWaveSize {
                        wave,
                        size: spec.size.to_string(),
                        reason: "a wave holds at least one agent",
                    });
                }
                WaveSize::Count(_) => {}
                WaveSize::Percent(p) => {
                    let in_range = p.is_finite() && p > 0.0 && p <= 100.0;
                    if !in_range {
                        return Err(SpecError::CheckWaveSize {
                            wave,
                            size: spec.size.to_string(),
                            reason: "a percentage must be above 0 and at most 100",
                        });
                    }
                    if wave < last {
                        total_percent += p;
                    }
                }
            }
        }
        // The last wave takes the rest, so the ones before it must leave some. The tolerance
        // keeps 33.3 + 33.3 + 33.3 from tripping over rounding.
        if total_percent >= 100.0 - 1e-9 {
            return Err(SpecError::CheckWaveTotal { total_percent });
        }

        self.gates.validate()?;

        if self.install_timeout_secs == 0 {
            return Err(SpecError::CheckInstallTimeout);
        }

        if let Some(key) = &self.stratify_by {
            check_label_key(key).map_err(|reason| SpecError::CheckStratifyKey {
                key: key.clone(),
                reason,
            })?;
        }
        Ok(())
    }
}

/// A bundle as an operator names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleRef {
    /// An exact bundle.
    Digest(Sha256Digest),
    /// A release of a model, `name@version`.
    Release {
        /// Model name.
        name: String,
        /// Model version.
        version: semver::Version,
    },
}

impl BundleRef {
    /// Whether a resolved bundle is the one this reference names.
    pub fn names(&self, digest: &Sha256Digest, name: &str, version: &str) -> bool {
        match self {
            Self::Digest(d) => d == digest,
            Self::Release {
                name: n,
                version: v,
            } => n == name && version.parse::<semver::Version>().ok().as_ref() == Some(v),
        }
    }
}

impl fmt::Display for BundleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Digest(d) => write!(f, "sha256:{}", d.to_hex()),
            Self::Release { name, version } => write!(f, "{name}@{version}"),
        }
    }
}

impl FromStr for BundleRef {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| SpecError::ParseBundleRef {
            bundle: s.to_owned(),
            reason,
        };
        let Some((name, version)) = s.split_once('@') else {
            let digest = s.parse().map_err(|e| invalid(format!("{e}")))?;
            return Ok(Self::Digest(digest));
        };
        check_model_name(name).map_err(invalid)?;
        let version = version
            .parse()
            .map_err(|e| invalid(format!("version {version:?}: {e}")))?;
        Ok(Self::Release {
            name: name.to_owned(),
            version,
        })
    }
}

impl Serialize for BundleRef {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BundleRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One wave: how many agents, and how long to watch them before the next wave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveSpec {
    /// How many of the targets this wave takes. The last wave always takes every target the
    /// earlier waves left, whatever its size says.
    pub size: WaveSize,
    /// How long the wave's agents run the new version before its gates decide, in seconds;
    /// the bake starts once every reachable agent of the wave installed or failed (or the
    /// install timeout passed). Required.
    pub bake_secs: u64,
}

/// A wave's size: `{"count": 5}` or `{"percent": 10}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveSize {
    /// A number of agents, at least 1.
    Count(u32),
    /// A percentage of all targets, in (0, 100]; rounded up so a wave never ends up empty.
    Percent(f64),
}

impl fmt::Display for WaveSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n} agents"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// A limit on a number of agents: `{"count": 0}` or `{"percent": 5}`. A gate with a
/// threshold fails when the measured value is above it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Threshold {
    /// At most this many agents.
    Count(u32),
    /// At most this percentage of the gate's denominator, in [0, 100].
    Percent(f64),
}

impl Threshold {
    /// The value a measurement is compared with, in the threshold's own unit.
    pub fn limit(&self) -> f64 {
        match self {
            Self::Count(n) => f64::from(*n),
            Self::Percent(p) => *p,
        }
    }

    /// `count` of `of` in this threshold's unit; `None` for a percentage of nothing.
    pub fn measure(&self, count: u64, of: u64) -> Option<f64> {
        match self {
            Self::Count(_) => Some(count as f64),
            Self::Percent(_) if of == 0 => None,
            Self::Percent(_) => Some(100.0 * count as f64 / of as f64),
        }
    }
}

/// The checks every wave must pass. Every field may be left out and then takes its default. A
/// gate set to `null` in JSON is switched off; TOML has no null, so there a gate is loosened
/// instead (`{ percent = 100 }`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Gates {
    /// Agents whose install failed for a reason other than a self-test, out of the wave's
    /// reachable agents. Default: 10%.
    pub max_install_failures: Option<Threshold>,
    /// Agents whose self-test failed, out of the wave's reachable agents. Default: 0 agents.
    pub max_self_test_failures: Option<Threshold>,
    /// Agents that went offline after receiving the new version, during their wave, out of
    /// the wave's agents that received it. Default: not gated.
    pub max_dropped: Option<Threshold>,
    /// Failed requests over all requests the new version served on the wave's agents since
    /// they activated it, in [0, 1]. Default: not gated.
    pub max_error_rate: Option<f64>,
    /// 99th-percentile latency of the new version over the wave's agents, in milliseconds.
    /// Default: not gated.
    pub max_p99_ms: Option<f64>,
    /// The new version's p99 over the previous version's p99, measured on the same agents
    /// (those that activated the new version and reported the previous one). The previous
    /// version's figure is its record as the agent last reported it: cumulative since the
    /// agent started, which stops growing once the new version serves. Default: not gated.
    pub max_p99_ratio: Option<f64>,
    /// Fraction of the wave's reachable agents that must have reported an outcome (a failure,
    /// or a heartbeat after activating) before the wave can pass, in (0, 1]. Offline agents
    /// are left out of the denominator, so the default of 1.0 asks only that every agent
    /// that can answer does.
    pub min_reporting: f64,
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            max_install_failures: Some(DEFAULT_MAX_INSTALL_FAILURES),
            max_self_test_failures: Some(DEFAULT_MAX_SELF_TEST_FAILURES),
            max_dropped: None,
            max_error_rate: None,
            max_p99_ms: None,
            max_p99_ratio: None,
            min_reporting: DEFAULT_MIN_REPORTING,
        }
    }
}

impl Gates {
    fn validate(&self) -> Result<(), SpecError> {
        let thresholds = [
            ("max_install_failures", self.max_install_failures),
            ("max_self_test_failures", self.max_self_test_failures),
            ("max_dropped", self.max_dropped),
        ];
        for (gate, threshold) in thresholds {
            if let Some(Threshold::Percent(p)) = threshold {
                check_range(gate, p, 0.0, 100.0, "[0, 100]")?;
            }
        }

        if let Some(rate) = self.max_error_rate {
            check_range("max_error_rate", rate, 0.0, 1.0, "[0, 1]")?;
        }
        if let Some(ms) = self.max_p99_ms {
            check_positive("max_p99_ms", ms)?;
        }
        if let Some(ratio) = self.max_p99_ratio {
            check_positive("max_p99_ratio", ratio)?;
        }

        let reporting_in_range = self.min_reporting > 0.0 && self.min_reporting <= 1.0;
        if !reporting_in_range {
            return Err(SpecError::CheckGate {
                gate: "min_reporting",
                value: self.min_reporting,
                allowed: "(0, 1]",
            });
        }
        Ok(())
    }
}

fn check_range(
    gate: &'static str,
    value: f64,
    low: f64,
    high: f64,
    allowed: &'static str,
) -> Result<(), SpecError> {
    if !(low..=high).contains(&value) {
        return Err(SpecError::CheckGate {
            gate,
            value,
            allowed,
        });
    }
    Ok(())
}

fn check_positive(gate: &'static str, value: f64) -> Result<(), SpecError> {
    if !(value.is_finite() && value > 0.0) {
        return Err(SpecError::CheckGate {
            gate,
            value,
            allowed: "a finite number above 0",
        });
    }
    Ok(())
}

/// What a failed gate leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Set every agent that received the new version back to what it ran before. The default.
    #[default]
    Rollback,
    /// Stop before the next wave and wait for an operator to resume or roll back.
    Pause,
}

/// Why a rollout spec is refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The JSON form does not parse or has unknown fields.
    #[error("parse rollout spec json: {0}")]
    ParseJson(#[source] serde_json::Error),
    /// The TOML form does not parse or has unknown fields.
    #[error("parse rollout spec toml: {0}")]
    ParseToml(#[source] toml::de::Error),
    /// The bundle reference is neither `name@version` nor a digest.
    #[error("parse bundle reference {bundle:?}: {reason}")]
    ParseBundleRef {
        /// The reference as given.
        bundle: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The spec lists no waves.
    #[error("check waves: a rollout needs at least one wave")]
    CheckWaveList,
    /// A wave's size is out of range.
    #[error("check wave {wave}: size {size}: {reason}")]
    CheckWaveSize {
        /// Index of the wave, from 0.
        wave: usize,
        /// The size as given.
        size: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The waves before the last take every target (or more), leaving the last none.
    #[error(
        "check waves: the waves before the last take {total_percent}% of the targets, \
         leaving none for the last (sizes are per wave, not cumulative)"
    )]
    CheckWaveTotal {
        /// Sum of the percentage sizes.
        total_percent: f64,
    },
    /// A gate's limit is out of range.
    #[error("check gate {gate}: {value} is outside {allowed}")]
    CheckGate {
        /// The gate's field name.
        gate: &'static str,
        /// The limit as given.
        value: f64,
        /// The values it may take.
        allowed: &'static str,
    },
    /// The install timeout is zero.
    #[error("check install_timeout_secs: must be at least 1 second")]
    CheckInstallTimeout,
    /// The stratification key is not a valid label key.
    #[error("check stratify_by {key:?}: {reason}")]
    CheckStratifyKey {
        /// The key as given.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE_JSON: &str = r#"{
        "bundle": "detector@2.1.0",
        "selector": "site in (lyon, paris), hw!=nano, !quarantine",
        "waves": [
            {"size": {"count": 2}, "bake_secs": 900},
            {"size": {"percent": 25}, "bake_secs": 1800},
            {"size": {"percent": 100}, "bake_secs": 3600}
        ],
        "gates": {
            "max_install_failures": {"percent": 5},
            "max_error_rate": 0.01,
            "max_p99_ms": 120,
            "max_p99_ratio": 1.25,
            "min_reporting": 0.9
        },
        "on_failure": "pause",
        "install_timeout_secs": 600,
        "stratify_by": "hw"
    }"#;

    fn minimal() -> RolloutSpec {
        RolloutSpec::from_json(
            r#"{"bundle": "detector@2.1.0", "selector": "", "waves": [{"size": {"count": 1}, "bake_secs": 60}]}"#,
        )
        .unwrap()
    }

    fn refused(edit: impl FnOnce(&mut RolloutSpec)) -> SpecError {
        let mut spec = minimal();
        edit(&mut spec);
        spec.validate().unwrap_err()
    }

    #[test]
    fn the_documented_json_example_parses_with_every_field() {
        let spec = RolloutSpec::from_json(EXAMPLE_JSON).unwrap();
        assert_eq!(spec.bundle.to_string(), "detector@2.1.0");
        assert_eq!(spec.waves.len(), 3);
        assert_eq!(spec.waves[1].size, WaveSize::Percent(25.0));
        assert_eq!(
            spec.gates.max_install_failures,
            Some(Threshold::Percent(5.0))
        );
        assert_eq!(
            spec.gates.max_self_test_failures,
            Some(DEFAULT_MAX_SELF_TEST_FAILURES),
            "omitted gates keep their defaults"
        );
        assert_eq!(spec.on_failure, OnFailure::Pause);
        assert_eq!(spec.stratify_by.as_deref(), Some("hw"));

        let again = RolloutSpec::from_json(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(again, spec);
    }

    #[test]
    fn omitted_fields_take_the_documented_defaults() {
        let spec = minimal();
        assert_eq!(spec.gates, Gates::default());
        assert_eq!(spec.gates.min_reporting, 1.0);
        assert_eq!(
            spec.gates.max_install_failures,
            Some(Threshold::Percent(10.0))
        );
        assert_eq!(spec.gates.max_self_test_failures, Some(Threshold::Count(0)));
        assert_eq!(spec.on_failure, OnFailure::Rollback);
        assert_eq!(spec.install_timeout_secs, 300);
        assert_eq!(spec.stratify_by, None);
    }

    #[test]
    fn a_gate_set_to_null_in_json_is_off() {
        let spec = RolloutSpec::from_json(
            r#"{"bundle": "detector@2.1.0", "selector": "", "gates": {"max_self_test_failures": null},
                "waves": [{"size": {"count": 1}, "bake_secs": 60}]}"#,
        )
        .unwrap();
        assert_eq!(spec.gates.max_self_test_failures, None);
        assert_eq!(
            spec.gates.max_install_failures,
            Some(DEFAULT_MAX_INSTALL_FAILURES)
        );
    }

    #[test]
    fn toml_form_parses_like_the_json_form() {
        let spec = RolloutSpec::from_toml(
            r#"
            bundle = "sha256:0000000000000000000000000000000000000000000000000000000000000001"
            selector = "hw in (orin, xavier)"
            on_failure = "rollback"

            [gates]
            max_self_test_failures = { count = 1 }
            max_p99_ratio = 1.5

            [[waves]]
            size = { count = 1 }
            bake_secs = 600

            [[waves]]
            size = { percent = 100 }
            bake_secs = 1200
            "#,
        )
        .unwrap();
        assert!(matches!(spec.bundle, BundleRef::Digest(_)));
        assert_eq!(spec.selector.to_string(), "hw in (orin,xavier)");
        assert_eq!(spec.gates.max_self_test_failures, Some(Threshold::Count(1)));
        assert_eq!(spec.waves[1].bake_secs, 1200);
    }

    #[test]
    fn unknown_fields_are_refused_in_both_forms() {
        let json = RolloutSpec::from_json(
            r#"{"bundle": "d@1.0.0", "selector": "", "waves": [], "gate": {}}"#,
        );
        assert!(
            matches!(json, Err(SpecError::ParseJson(e)) if e.to_string().contains("unknown field `gate`"))
        );

        let toml = RolloutSpec::from_toml(
            "bundle = \"d@1.0.0\"\nselector = \"\"\n[[waves]]\nsize = { count = 1 }\nbake_secs = 1\nbake = 2\n",
        );
        assert!(
            matches!(toml, Err(SpecError::ParseToml(e)) if e.to_string().contains("unknown field `bake`"))
        );
    }

    #[test]
    fn negative_bake_and_malformed_bundles_fail_to_parse() {
        let negative = RolloutSpec::from_json(
            r#"{"bundle": "d@1.0.0", "selector": "", "waves": [{"size": {"count": 1}, "bake_secs": -5}]}"#,
        );
        assert!(matches!(negative, Err(SpecError::ParseJson(_))));

        for bad in ["detector", "Detector@1.0.0", "detector@one", "sha256:xyz"] {
            let err = bad.parse::<BundleRef>().unwrap_err();
            assert!(
                matches!(&err, SpecError::ParseBundleRef { bundle, .. } if bundle == bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn wave_sizes_are_checked() {
        assert!(matches!(
            refused(|s| s.waves.clear()),
            SpecError::CheckWaveList
        ));
        let zero = refused(|s| s.waves[0].size = WaveSize::Count(0));
        assert!(matches!(zero, SpecError::CheckWaveSize { wave: 0, .. }));
        for p in [0.0, -1.0, 100.5, f64::NAN] {
            let err = refused(|s| s.waves[0].size = WaveSize::Percent(p));
            assert!(
                matches!(err, SpecError::CheckWaveSize { wave: 0, .. }),
                "{p}: {err}"
            );
        }
    }

    #[test]
    fn waves_before_the_last_must_leave_it_some_targets() {
        let wave = |p| WaveSpec {
            size: WaveSize::Percent(p),
            bake_secs: 60,
        };
        let cumulative =
            refused(|s| s.waves = vec![wave(10.0), wave(50.0), wave(100.0), wave(100.0)]);
        assert!(
            matches!(cumulative, SpecError::CheckWaveTotal { total_percent } if total_percent == 160.0)
        );
        assert!(cumulative.to_string().contains("not cumulative"));

        let mut spec = minimal();
        spec.waves = vec![wave(10.0), wave(40.0), wave(100.0)];
        spec.validate().unwrap();
        spec.waves = vec![wave(33.3), wave(33.3), wave(33.3), wave(100.0)];
        spec.validate().unwrap();
    }

    #[test]
    fn gate_limits_out_of_range_are_refused_by_name() {
        type Edit = fn(&mut RolloutSpec);
        let cases: [(&str, Edit); 7] = [
            ("max_install_failures", |s| {
                s.gates.max_install_failures = Some(Threshold::Percent(101.0))
            }),
            ("max_dropped", |s| {
                s.gates.max_dropped = Some(Threshold::Percent(-1.0))
            }),
            ("max_error_rate", |s| s.gates.max_error_rate = Some(1.5)),
            ("max_p99_ms", |s| s.gates.max_p99_ms = Some(0.0)),
            ("max_p99_ratio", |s| {
                s.gates.max_p99_ratio = Some(f64::INFINITY)
            }),
            ("min_reporting", |s| s.gates.min_reporting = 0.0),
            ("min_reporting", |s| s.gates.min_reporting = 1.01),
        ];
        for (name, edit) in cases {
            match refused(edit) {
                SpecError::CheckGate { gate, .. } => assert_eq!(gate, name),
                other => panic!("{name}: {other}"),
            }
        }
    }

    #[test]
    fn install_timeout_and_stratification_key_are_checked() {
        assert!(matches!(
            refused(|s| s.install_timeout_secs = 0),
            SpecError::CheckInstallTimeout
        ));
        let key = refused(|s| s.stratify_by = Some("hw class".into()));
        assert!(matches!(key, SpecError::CheckStratifyKey { key, .. } if key == "hw class"));
    }

    #[test]
    fn bundle_refs_name_only_their_own_bundle() {
        let digest = Sha256Digest::of(b"bundle");
        let by_release: BundleRef = "detector@2.1.0".parse().unwrap();
        assert!(by_release.names(&digest, "detector", "2.1.0"));
        assert!(!by_release.names(&digest, "detector", "2.1.1"));
        assert!(!by_release.names(&digest, "classifier", "2.1.0"));

        let by_digest: BundleRef = digest.to_hex().parse().unwrap();
        assert!(by_digest.names(&digest, "anything", "0.0.1"));
        assert!(!by_digest.names(&Sha256Digest::of(b"other"), "anything", "0.0.1"));
        assert_eq!(
            by_digest.to_string().parse::<BundleRef>().unwrap(),
            by_digest
        );
    }
}
