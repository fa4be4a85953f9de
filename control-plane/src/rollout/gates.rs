//! Gate evaluation: a wave's tally against the spec's limits, with every number kept.
//!
//! The engine counts a wave's agents into a [`Tally`]; [`evaluate`] turns it into one
//! [`GateValue`] per configured gate, in a fixed order, so the API can show exactly what was
//! measured, against which limit, and whether it passed.

use serde::{Deserialize, Serialize};

use super::metrics::Window;
use super::spec::{Gates, Threshold};

/// The gates a wave can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateName {
    /// [`Gates::max_install_failures`].
    InstallFailures,
    /// [`Gates::max_self_test_failures`].
    SelfTestFailures,
    /// [`Gates::max_dropped`].
    Dropped,
    /// [`Gates::max_error_rate`].
    ErrorRate,
    /// [`Gates::max_p99_ms`].
    P99Ms,
    /// [`Gates::max_p99_ratio`].
    P99Ratio,
    /// [`Gates::min_reporting`].
    Reporting,
}

impl GateName {
    /// The name used in specs and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InstallFailures => "install_failures",
            Self::SelfTestFailures => "self_test_failures",
            Self::Dropped => "dropped",
            Self::ErrorRate => "error_rate",
            Self::P99Ms => "p99_ms",
            Self::P99Ratio => "p99_ratio",
            Self::Reporting => "reporting",
        }
    }

    /// `basis` with what [`GateValue::basis`] counts for this gate: "3 reachable agents",
    /// "1 paired request".
    pub fn basis_text(self, basis: u64) -> String {
        let (one, many) = match self {
            Self::InstallFailures | Self::SelfTestFailures | Self::Reporting => {
                ("reachable agent", "reachable agents")
            }
            Self::Dropped => ("agent that received it", "agents that received it"),
            Self::ErrorRate | Self::P99Ms => ("request", "requests"),
            Self::P99Ratio => ("paired request", "paired requests"),
        };
        format!("{basis} {}", if basis == 1 { one } else { many })
    }

    /// Whether the gate can only get worse as a wave goes on, so a breach decides the wave
    /// at once instead of at the end of the bake.
    pub fn decides_early(self) -> bool {
        matches!(
            self,
            Self::InstallFailures | Self::SelfTestFailures | Self::Dropped
        )
    }
}

/// One gate's measurement against its limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateValue {
    /// Which gate.
    pub gate: GateName,
    /// What was measured, in the limit's unit (agents, percent, a rate, milliseconds, a
    /// ratio, a fraction); `None` when there was nothing to measure.
    pub value: Option<f64>,
    /// The limit from the spec: a maximum, except for reporting where it is a minimum.
    pub threshold: f64,
    /// What the value is taken over: reachable agents, agents that received the new version,
    /// or requests.
    pub basis: u64,
    /// Whether the gate holds. A metric gate with nothing to measure holds (no traffic shows
    /// no regression); the reporting gate with nobody reachable does not.
    pub passed: bool,
}

/// What the engine counted over one wave's agents.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Tally {
    /// Agents that are online (and were assigned before the bake began) or have an outcome.
    pub(crate) reachable: u64,
    /// Reachable agents with an outcome the gates can use.
    pub(crate) reported: u64,
    /// Agents whose install failed for a reason other than a self-test.
    pub(crate) install_failures: u64,
    /// Agents whose self-test failed.
    pub(crate) self_test_failures: u64,
    /// Agents that received the new version during this wave.
    pub(crate) received: u64,
    /// Agents that went offline after receiving it.
    pub(crate) dropped: u64,
    /// The new version over the wave's active agents.
    pub(crate) new: Window,
    /// Active agents contributing to `new`.
    pub(crate) new_agents: usize,
    /// The new version over the active agents that also reported the previous version.
    pub(crate) new_paired: Window,
    /// The previous version over those same agents.
    pub(crate) previous: Window,
    /// Agents contributing to `previous` and `new_paired`.
    pub(crate) paired_agents: usize,
}

/// Every configured gate over `tally`, in [`GateName`] order. The reporting gate is always
/// present.
pub(crate) fn evaluate(gates: &Gates, tally: &Tally) -> Vec<GateValue> {
    let mut values = Vec::new();

    let counted = [
        (
            GateName::InstallFailures,
            gates.max_install_failures,
            tally.install_failures,
            tally.reachable,
        ),
        (
            GateName::SelfTestFailures,
            gates.max_self_test_failures,
            tally.self_test_failures,
            tally.reachable,
        ),
        (
            GateName::Dropped,
            gates.max_dropped,
            tally.dropped,
            tally.received,
        ),
    ];
    for (gate, threshold, count, of) in counted {
        if let Some(threshold) = threshold {
            values.push(count_gate(gate, threshold, count, of));
        }
    }

    if let Some(limit) = gates.max_error_rate {
        values.push(at_most(
            GateName::ErrorRate,
            tally.new.error_rate(),
            limit,
            tally.new.requests,
        ));
    }
    if let Some(limit) = gates.max_p99_ms {
        values.push(at_most(
            GateName::P99Ms,
            tally.new.quantile(0.99),
            limit,
            tally.new.requests,
        ));
    }
    if let Some(limit) = gates.max_p99_ratio {
        let ratio = match (
            tally.new_paired.quantile(0.99),
            tally.previous.quantile(0.99),
        ) {
            (Some(new), Some(previous)) if previous > 0.0 => Some(new / previous),
            _ => None,
        };
        values.push(at_most(
            GateName::P99Ratio,
            ratio,
            limit,
            tally.new_paired.requests,
        ));
    }

    let reporting = (tally.reachable > 0).then(|| tally.reported as f64 / tally.reachable as f64);
    // Compared as counts so 4 of 5 meets 0.8 whatever the rounding of 4.0 / 5.0.
    let reporting_met = tally.reachable > 0
        && tally.reported as f64 >= gates.min_reporting * tally.reachable as f64 - 1e-9;
    values.push(GateValue {
        gate: GateName::Reporting,
        value: reporting,
        threshold: gates.min_reporting,
        basis: tally.reachable,
        passed: reporting_met,
    });
    values
}

fn count_gate(gate: GateName, threshold: Threshold, count: u64, of: u64) -> GateValue {
    let value = threshold.measure(count, of);
    GateValue {
        gate,
        value,
        threshold: threshold.limit(),
        basis: of,
        passed: value.is_none_or(|v| v <= threshold.limit()),
    }
}

fn at_most(gate: GateName, value: Option<f64>, limit: f64, basis: u64) -> GateValue {
    GateValue {
        gate,
        value,
        threshold: limit,
        basis,
        passed: value.is_none_or(|v| v <= limit),
    }
}

#[cfg(test)]
mod tests {
    use flotilla_shared::wire::Histogram;

    use super::*;

    fn window(requests: u64, errors: u64, latency_ms: f64) -> Window {
        let mut latency = Histogram::default();
        for _ in 0..requests {
            latency.observe(latency_ms);
        }
        Window {
            requests,
            errors,
            latency: Some(latency),
        }
    }

    fn value(values: &[GateValue], gate: GateName) -> &GateValue {
        values
            .iter()
            .find(|v| v.gate == gate)
            .unwrap_or_else(|| panic!("{gate:?} missing from {values:?}"))
    }

    #[test]
    fn gate_names_are_the_serialised_ones() {
        for gate in [
            GateName::InstallFailures,
            GateName::SelfTestFailures,
            GateName::Dropped,
            GateName::ErrorRate,
            GateName::P99Ms,
            GateName::P99Ratio,
            GateName::Reporting,
        ] {
            let serialised = serde_json::to_value(gate).unwrap();
            assert_eq!(serialised, gate.as_str());
        }
        assert_eq!(GateName::Reporting.basis_text(1), "1 reachable agent");
        assert_eq!(GateName::P99Ratio.basis_text(163), "163 paired requests");
    }

    #[test]
    fn unconfigured_gates_are_absent_except_reporting() {
        let gates = Gates {
            max_install_failures: None,
            max_self_test_failures: None,
            ..Gates::default()
        };
        let values = evaluate(&gates, &Tally::default());
        assert_eq!(values.len(), 1);
        assert_eq!(values[0].gate, GateName::Reporting);
        assert!(
            !values[0].passed,
            "nobody reachable never meets the reporting gate"
        );
    }

    #[test]
    fn percentage_gates_measure_against_reachable_agents() {
        let gates = Gates {
            max_install_failures: Some(Threshold::Percent(20.0)),
            ..Gates::default()
        };
        let tally = Tally {
            reachable: 10,
            reported: 10,
            install_failures: 2,
            ..Tally::default()
        };
        let values = evaluate(&gates, &tally);
        let install = value(&values, GateName::InstallFailures);
        assert_eq!(
            (install.value, install.basis, install.passed),
            (Some(20.0), 10, true)
        );

        let tally = Tally {
            install_failures: 3,
            ..tally
        };
        assert!(!value(&evaluate(&gates, &tally), GateName::InstallFailures).passed);
    }

    #[test]
    fn metric_gates_without_traffic_hold_and_say_so() {
        let gates = Gates {
            max_error_rate: Some(0.01),
            max_p99_ms: Some(50.0),
            max_p99_ratio: Some(1.2),
            ..Gates::default()
        };
        let values = evaluate(&gates, &Tally::default());
        for gate in [GateName::ErrorRate, GateName::P99Ms, GateName::P99Ratio] {
            let v = value(&values, gate);
            assert_eq!((v.value, v.passed), (None, true), "{gate:?}");
        }
    }

    #[test]
    fn p99_ratio_compares_the_same_agents() {
        let gates = Gates {
            max_p99_ratio: Some(1.5),
            ..Gates::default()
        };
        let tally = Tally {
            new_paired: window(100, 0, 40.0),
            previous: window(100, 0, 20.0),
            paired_agents: 1,
            ..Tally::default()
        };
        let ratio = value(&evaluate(&gates, &tally), GateName::P99Ratio).clone();
        assert!(!ratio.passed);
        let measured = ratio.value.unwrap();
        assert!(measured > 1.5, "{measured}");
    }

    #[test]
    fn reporting_fraction_is_compared_without_rounding_surprises() {
        let gates = Gates {
            min_reporting: 0.8,
            ..Gates::default()
        };
        let tally = Tally {
            reachable: 5,
            reported: 4,
            ..Tally::default()
        };
        assert!(value(&evaluate(&gates, &tally), GateName::Reporting).passed);
        let tally = Tally {
            reported: 3,
            ..tally
        };
        assert!(!value(&evaluate(&gates, &tally), GateName::Reporting).passed);
    }
}
