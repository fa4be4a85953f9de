//! Inference metrics, recorded once per request into both the Prometheus registry behind
//! `GET /metrics` and the per-version histograms that heartbeats carry to the control plane.
//!
//! Every label set is bounded: `{model, version}`, `{model, version, outcome}` and
//! `{endpoint, status}`, where `endpoint` is a route template. No per-request value ever becomes
//! a label.
//!
//! Exposed series (Prometheus text format 0.0.4):
//!
//! | name | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | `flotilla_inference_requests_total` | counter | model, version, outcome | requests that got a model, by outcome `success`, `client_error` or `model_error` |
//! | `flotilla_inference_errors_total` | counter | model, version | model-side failures (the `model_error` outcome) |
//! | `flotilla_inference_duration_seconds` | histogram | model, version | time from taking the model to having the answer, tokenisation included; client errors are not observed. Buckets are [`LATENCY_BOUNDS_MS`] in seconds |
//! | `flotilla_inference_in_flight` | gauge | model, version | requests running on the model now |
//! | `flotilla_model_load_seconds` | gauge | model, version | how long loading and optimising took |
//! | `flotilla_model_self_test_passed` | gauge | model, version | 1 when the install self-test passed, 0 when it failed |
//! | `flotilla_http_responses_total` | counter | endpoint, status | every HTTP response, including 429, 503 and 413 that never reach a model |
//! | `process_resident_memory_bytes` | gauge | | resident memory of the agent process |
//! | `process_cpu_seconds_total` | counter | | user and system CPU time of the agent process |

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use flotilla_shared::wire::{Histogram as WireHistogram, VersionMetrics, LATENCY_BOUNDS_MS};
use flotilla_shared::Sha256Digest;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::serving::ServedModel;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How a request that got a model ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The model answered.
    Success,
    /// The request was at fault (wrong shape, text too long...); the model is fine.
    ClientError,
    /// The model or the host failed.
    ModelError,
}

impl Outcome {
    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::ClientError => "client_error",
            Self::ModelError => "model_error",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    model: String,
    version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    model: String,
    version: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EngineLabels {
    model: String,
    version: String,
    backend: String,
    provider: String,
}

type LatencyFamily = Family<VersionLabels, Histogram, fn() -> Histogram>;

/// Per-version counters for heartbeats, in the order versions were first seen.
#[derive(Debug, Default)]
struct VersionBook {
    versions: Vec<VersionMetrics>,
    /// Self-test results reported before the version's first load or request.
    pending_self_tests: Vec<(Sha256Digest, bool)>,
}

impl VersionBook {
    fn entry(&mut self, model: &ServedModel) -> &mut VersionMetrics {
        let index = match self.versions.iter().position(|v| v.digest == model.digest) {
            Some(index) => index,
            None => {
                let pending = self
                    .pending_self_tests
                    .iter()
                    .position(|(d, _)| *d == model.digest);
                let self_test_passed = pending.map(|i| self.pending_self_tests.swap_remove(i).1);
                self.versions.push(VersionMetrics {
                    name: model.name().to_owned(),
                    version: model.version(),
                    digest: model.digest,
                    requests: 0,
                    errors: 0,
                    latency: WireHistogram::default(),
                    self_test_passed,
                });
                self.versions.len() - 1
            }
        };
        &mut self.versions[index]
    }
}

/// Request, error, latency, model and process metrics, shared by the API and heartbeats.
///
/// Cheap to record into: a few atomic increments and one short lock per request. Share it as
/// an `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    errors: Family<VersionLabels, Counter>,
    latency: LatencyFamily,
    in_flight: Family<VersionLabels, Gauge>,
    load_time: Family<VersionLabels, Gauge<f64, AtomicU64>>,
    self_test: Family<VersionLabels, Gauge>,
    responses: Family<EndpointLabels, Counter>,
    engine: Family<EngineLabels, Gauge>,
    degraded: Family<VersionLabels, Gauge>,
    book: Mutex<VersionBook>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BOUNDS_MS.iter().map(|ms| ms / 1000.0))
}

impl Metrics {
    /// An empty set of metrics with every series registered.
    pub fn new() -> Self {
        let requests = Family::<OutcomeLabels, Counter>::default();
        let errors = Family::<VersionLabels, Counter>::default();
        let latency: LatencyFamily = Family::new_with_constructor(latency_histogram);
        let in_flight = Family::<VersionLabels, Gauge>::default();
        let load_time = Family::<VersionLabels, Gauge<f64, AtomicU64>>::default();
        let self_test = Family::<VersionLabels, Gauge>::default();
        let responses = Family::<EndpointLabels, Counter>::default();
        let engine = Family::<EngineLabels, Gauge>::default();
        let degraded = Family::<VersionLabels, Gauge>::default();

        let mut registry = Registry::default();
        registry.register(
            "flotilla_inference_requests",
            "Requests that got a model, by outcome",
            requests.clone(),
        );
        registry.register(
            "flotilla_inference_errors",
            "Requests that failed on the model side",
            errors.clone(),
        );
        registry.register(
            "flotilla_inference_duration_seconds",
            "Time from taking the model to having the answer, tokenisation included",
            latency.clone(),
        );
        registry.register(
            "flotilla_inference_in_flight",
            "Requests running on the model now",
            in_flight.clone(),
        );
        registry.register(
            "flotilla_model_load_seconds",
            "How long loading and optimising the model took",
            load_time.clone(),
        );
        registry.register(
            "flotilla_model_self_test_passed",
            "Whether the install self-test passed (1) or failed (0)",
            self_test.clone(),
        );
        registry.register(
            "flotilla_http_responses",
            "HTTP responses by route template and status code",
            responses.clone(),
        );
        registry.register(
            "flotilla_model_engine",
            "The backend and execution provider actually running the served model (always 1)",
            engine.clone(),
        );
        registry.register(
            "flotilla_model_degraded",
            "Whether the served model runs on a fallback backend (1) or its best one (0)",
            degraded.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector));

        Self {
            registry,
            requests,
            errors,
            latency,
            in_flight,
            load_time,
            self_test,
            responses,
            engine,
            degraded,
            book: Mutex::new(VersionBook::default()),
        }
    }

    fn book(&self) -> MutexGuard<'_, VersionBook> {
        // The book holds plain counters that stay consistent even if a holder panicked.
        self.book
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks one request as running on `model` until the returned guard is dropped.
    pub fn start(&self, model: &ServedModel) -> InFlight {
        let gauge = self.in_flight.get_or_create_owned(&version_labels(model));
        gauge.inc();
        InFlight { gauge }
    }

    /// Records one finished request on `model`. Client errors are counted by outcome only: they
    /// are not model failures and their latency says nothing about the model.
    pub fn record(&self, model: &ServedModel, outcome: Outcome, elapsed: Duration) {
        let labels = version_labels(model);
        self.requests
            .get_or_create(&OutcomeLabels {
                model: labels.model.clone(),
                version: labels.version.clone(),
                outcome: outcome.as_str(),
            })
            .inc();
        if outcome == Outcome::ClientError {
            return;
        }
        if outcome == Outcome::ModelError {
            self.errors.get_or_create(&labels).inc();
        }
        self.latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());

        let mut book = self.book();
        let entry = book.entry(model);
        entry.requests += 1;
        if outcome == Outcome::ModelError {
            entry.errors += 1;
        }
        entry.latency.observe(elapsed.as_secs_f64() * 1000.0);
    }

    /// Records one HTTP response; `endpoint` is the route template, never the raw path.
    pub fn record_response(&self, endpoint: &str, status: u16) {
        self.responses
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.to_owned(),
                status,
            })
            .inc();
    }

    /// Records which engine runs `model` now and whether that is a fallback; the series of
    /// models no longer served are dropped.
    pub fn observe_engine(&self, model: &ServedModel) {
        let info = model.model.info();
        let labels = version_labels(model);
        self.engine.clear();
        self.engine
            .get_or_create(&EngineLabels {
                model: labels.model.clone(),
                version: labels.version.clone(),
                backend: info.backend.to_string(),
                provider: info.provider,
            })
            .set(1);
        self.degraded.clear();
        let degraded = model.model.degradation().is_some();
        self.degraded
            .get_or_create(&labels)
            .set(i64::from(degraded));
    }

    /// Records that `model` finished loading; its version appears in snapshots from now on.
    pub fn model_loaded(&self, model: &ServedModel) {
        self.load_time
            .get_or_create(&version_labels(model))
            .set(model.load_time.as_secs_f64());
        let mut book = self.book();
        let entry = book.entry(model);
        if let Some(passed) = entry.self_test_passed {
            let labels = VersionLabels {
                model: entry.name.clone(),
                version: entry.version.clone(),
            };
            self.self_test.get_or_create(&labels).set(i64::from(passed));
        }
    }

    /// Records the install self-test result of the bundle `digest`. A result for a bundle not
    /// seen yet is kept until [`Metrics::model_loaded`] or a request introduces it.
    pub fn set_self_test(&self, digest: Sha256Digest, passed: bool) {
        let mut book = self.book();
        let Some(entry) = book.versions.iter_mut().find(|v| v.digest == digest) else {
            book.pending_self_tests.retain(|(d, _)| *d != digest);
            book.pending_self_tests.push((digest, passed));
            return;
        };
        entry.self_test_passed = Some(passed);
        let labels = VersionLabels {
            model: entry.name.clone(),
            version: entry.version.clone(),
        };
        self.self_test.get_or_create(&labels).set(i64::from(passed));
    }

    /// Cumulative metrics of every version seen since start, active or not, in the order they
    /// were first seen.
    pub fn version_snapshots(&self) -> Vec<VersionMetrics> {
        self.book().versions.clone()
    }

    /// The Prometheus text exposition (format 0.0.4, see [`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("invariant: writing to a String cannot fail");
        out
    }
}

fn version_labels(model: &ServedModel) -> VersionLabels {
    VersionLabels {
        model: model.name().to_owned(),
        version: model.version(),
    }
}

/// A request counted in the in-flight gauge; dropping it ends the count, however the request
/// ended (even by panic).
#[derive(Debug)]
pub struct InFlight {
    gauge: Gauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Resource use of this process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// User plus system CPU time since the process started, seconds.
    pub cpu_seconds: f64,
}

/// Clock ticks per second in `/proc/<pid>/stat`. Linux fixes `USER_HZ` at 100 for user space on
/// every architecture it runs on, and `unsafe` is forbidden here, so `sysconf` is not asked.
const USER_HZ: f64 = 100.0;

impl ProcessStats {
    /// Reads `/proc/self/status` and `/proc/self/stat`; zeros where they cannot be read (other
    /// operating systems).
    pub fn read() -> Self {
        // `VmRSS` in `status` is in kB already; `statm` counts pages, whose size would need
        // `sysconf` (16 KiB and 64 KiB pages exist on arm64).
        let rss_bytes = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|text| parse_status_rss_kb(&text))
            .map_or(0, |kb| kb.saturating_mul(1024));
        let cpu_seconds = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|text| parse_stat_cpu_ticks(&text))
            .map_or(0.0, |ticks| ticks as f64 / USER_HZ);
        Self {
            rss_bytes,
            cpu_seconds,
        }
    }
}

/// The `VmRSS:` line of `status`, in kB.
fn parse_status_rss_kb(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// `utime + stime` in clock ticks: fields 14 and 15 of `stat`. The command name (field 2) is
/// parenthesised and may hold spaces or parentheses, so fields are counted after the last `)`.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state), so utime (field 14) is its 12th field.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Reads process resource use at every scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = ProcessStats::read();

        let rss = ConstGauge::new(stats.rss_bytes as f64);
        let metric = encoder.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            None,
            rss.metric_type(),
        )?;
        rss.encode(metric)?;

        let cpu = ConstCounter::new(stats.cpu_seconds);
        let metric = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?;
        cpu.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_ticks_skip_a_command_name_with_spaces_and_parentheses() {
        let stat = "1234 (my (odd) agent) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 8 0 100 0 0";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(300));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn status_resident_memory_is_read_from_the_vmrss_line() {
        let status =
            "Name:\tflotilla-agent\nVmPeak:\t  9000 kB\nVmRSS:\t    1200 kB\nThreads:\t4\n";
        assert_eq!(parse_status_rss_kb(status), Some(1200));
        assert_eq!(parse_status_rss_kb("Name:\tx\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_stats_are_read_on_linux() {
        let stats = ProcessStats::read();
        assert!(stats.rss_bytes > 1024 * 1024, "{stats:?}");
        assert!(stats.cpu_seconds >= 0.0);
    }
}
