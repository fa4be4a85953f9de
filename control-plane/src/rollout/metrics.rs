//! Inference metrics over windows: turning agents' cumulative heartbeats into per-wave figures.
//!
//! Agents report counters and latency histograms cumulative since they started. The engine
//! keeps each agent's last report of the new version and adds up the difference of every
//! following one, so a restart (a new session, or counters that went down) starts a fresh
//! count instead of producing nonsense, and traffic from before activation is never counted.
//! Windows of several agents add up bucket by bucket.

use flotilla_shared::wire::{Histogram, VersionMetrics};
use serde::{Deserialize, Serialize};

/// Requests, failed requests and latency over some stretch of time.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Window {
    /// Requests served.
    pub requests: u64,
    /// Requests that failed on the model side.
    pub errors: u64,
    /// Latency of those requests; `None` until a histogram was added.
    pub latency: Option<Histogram>,
}

impl Window {
    /// Adds `other` to this window. A histogram whose bucket bounds differ from the ones
    /// already held is left out of the latency (its requests and errors still count), and
    /// the call says so by returning `false`.
    pub fn add(&mut self, other: &Window) -> bool {
        // Saturating: a misbehaving agent's counters must not crash the control plane.
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        let Some(theirs) = &other.latency else {
            return true;
        };
        let Some(ours) = &mut self.latency else {
            self.latency = Some(theirs.clone());
            return true;
        };
        let same_buckets =
            ours.bounds_ms == theirs.bounds_ms && ours.counts.len() == theirs.counts.len();
        if !same_buckets {
            return false;
        }
        for (mine, their) in ours.counts.iter_mut().zip(&theirs.counts) {
            *mine = mine.saturating_add(*their);
        }
        ours.sum_ms += theirs.sum_ms;
        true
    }

    /// Failed over all requests; `None` when nothing was served.
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    /// Estimated latency quantile in milliseconds; `None` when nothing was observed.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.latency.as_ref()?.quantile(q)
    }

    /// The figures an operator compares, over `agents` agents.
    pub fn summary(&self, agents: usize) -> VersionSummary {
        VersionSummary {
            agents,
            requests: self.requests,
            errors: self.errors,
            error_rate: self.error_rate(),
            p50_ms: self.quantile(0.5),
            p99_ms: self.quantile(0.99),
        }
    }
}

/// One version's figures over a wave's agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionSummary {
    /// Agents the figures come from.
    pub agents: usize,
    /// Requests served.
    pub requests: u64,
    /// Requests that failed on the model side.
    pub errors: u64,
    /// `errors / requests`; `None` when nothing was served.
    pub error_rate: Option<f64>,
    /// Median latency, milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th-percentile latency, milliseconds.
    pub p99_ms: Option<f64>,
}

/// The new version next to the previous one, for one wave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Wave index, from 0.
    pub wave: usize,
    /// The new version since each agent activated it.
    pub new: VersionSummary,
    /// The previous version on those of the same agents that reported it, as last reported
    /// (cumulative since the agent started).
    pub previous: VersionSummary,
}

/// Cumulative counters of one version as an agent last reported them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Snapshot {
    session: u64,
    requests: u64,
    errors: u64,
    latency: Histogram,
}

impl Snapshot {
    fn new(session: u64, metrics: &VersionMetrics) -> Self {
        Self {
            session,
            requests: metrics.requests,
            errors: metrics.errors,
            latency: metrics.latency.clone(),
        }
    }

    /// What happened between `earlier` and this report; everything when the counters were
    /// reset in between or there is no earlier report.
    fn since(&self, earlier: Option<&Snapshot>) -> Window {
        let whole = Window {
            requests: self.requests,
            errors: self.errors,
            latency: Some(self.latency.clone()),
        };
        let Some(earlier) = earlier else {
            return whole;
        };
        let restarted = earlier.session != self.session
            || self.requests < earlier.requests
            || self.errors < earlier.errors
            || self.latency.count() < earlier.latency.count();
        if restarted {
            return whole;
        }
        Window {
            requests: self.requests - earlier.requests,
            errors: self.errors - earlier.errors,
            latency: Some(self.latency.since(&earlier.latency)),
        }
    }
}

/// What the engine knows about one agent's inference metrics.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub(crate) struct AgentMetrics {
    /// The new version's last cumulative report.
    new_last: Option<Snapshot>,
    /// The new version since the agent activated it.
    pub(crate) new: Window,
    /// The previous version's last cumulative report that had served anything.
    pub(crate) previous: Option<Window>,
}

impl AgentMetrics {
    /// Takes in a report of the new version; it counts only while `counting` (the agent has
    /// activated the new version), otherwise it only moves the baseline.
    pub(crate) fn observe_new(&mut self, session: u64, metrics: &VersionMetrics, counting: bool) {
        let current = Snapshot::new(session, metrics);
        if counting {
            let delta = current.since(self.new_last.as_ref());
            self.new.add(&delta);
        }
        self.new_last = Some(current);
    }

    /// Takes in a report of the previous version. A report that served nothing (a fresh
    /// session after a restart) does not replace an earlier one that did.
    pub(crate) fn observe_previous(&mut self, metrics: &VersionMetrics) {
        if metrics.requests == 0 && self.previous.is_some() {
            return;
        }
        self.previous = Some(Window {
            requests: metrics.requests,
            errors: metrics.errors,
            latency: Some(metrics.latency.clone()),
        });
    }
}

#[cfg(test)]
mod tests {
    use flotilla_shared::Sha256Digest;

    use super::*;

    fn report(requests: u64, errors: u64, latencies: &[f64]) -> VersionMetrics {
        let mut latency = Histogram::default();
        for &ms in latencies {
            latency.observe(ms);
        }
        VersionMetrics {
            name: "m".into(),
            version: "2.0.0".into(),
            digest: Sha256Digest::of(b"m"),
            requests,
            errors,
            latency,
            self_test_passed: Some(true),
        }
    }

    #[test]
    fn cumulative_reports_are_differenced_from_activation_on() {
        let mut metrics = AgentMetrics::default();
        metrics.observe_new(1, &report(10, 1, &[4.0; 10]), false);
        assert_eq!(metrics.new.requests, 0, "nothing counts before activation");

        metrics.observe_new(1, &report(30, 2, &[4.0; 30]), true);
        metrics.observe_new(1, &report(50, 2, &[4.0; 50]), true);
        assert_eq!((metrics.new.requests, metrics.new.errors), (40, 1));
        assert_eq!(metrics.new.latency.as_ref().unwrap().count(), 40);
    }

    #[test]
    fn a_restart_starts_a_fresh_count_instead_of_going_negative() {
        let mut metrics = AgentMetrics::default();
        metrics.observe_new(1, &report(100, 0, &[4.0; 100]), true);
        metrics.observe_new(2, &report(5, 5, &[4.0; 5]), true);
        assert_eq!((metrics.new.requests, metrics.new.errors), (105, 5));

        // Same session, but the counters went down: also a reset.
        metrics.observe_new(2, &report(3, 0, &[4.0; 3]), true);
        assert_eq!(metrics.new.requests, 108);
    }

    #[test]
    fn windows_add_bucket_by_bucket_and_skip_foreign_buckets() {
        let mut sum = Window::default();
        let fast = Snapshot::new(1, &report(90, 0, &[4.0; 90])).since(None);
        let slow = Snapshot::new(1, &report(10, 0, &[80.0; 10])).since(None);
        assert!(sum.add(&fast));
        assert!(sum.add(&slow));
        assert_eq!(sum.requests, 100);
        let p99 = sum.quantile(0.99).unwrap();
        assert!((50.0..=100.0).contains(&p99), "{p99}");

        let foreign = Window {
            requests: 1,
            errors: 1,
            latency: Some(Histogram {
                bounds_ms: vec![1.0],
                counts: vec![0, 1],
                sum_ms: 9.0,
            }),
        };
        assert!(!sum.add(&foreign));
        assert_eq!((sum.requests, sum.errors), (101, 1));
        assert_eq!(sum.latency.as_ref().unwrap().count(), 100);
    }

    #[test]
    fn previous_version_keeps_its_last_report_that_served_traffic() {
        let mut metrics = AgentMetrics::default();
        metrics.observe_previous(&report(500, 5, &[3.0; 500]));
        metrics.observe_previous(&report(0, 0, &[]));
        assert_eq!(metrics.previous.as_ref().unwrap().requests, 500);
        assert_eq!(metrics.previous.as_ref().unwrap().error_rate(), Some(0.01));
    }
}
