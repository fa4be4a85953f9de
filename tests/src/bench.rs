//! What the benchmarks report for a path (throughput and latency percentiles), and the
//! `BENCH_*` settings they read.

use std::time::Duration;

/// One path's figures.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Items (requests or sentences) per second of `wall`.
    pub per_second: f64,
    /// Median latency.
    pub p50_ms: f64,
    /// 99th-percentile latency.
    pub p99_ms: f64,
}

impl Timing {
    /// Figures for `items` served in `wall`, from each request's latency.
    pub fn of(latencies: &[Duration], items: usize, wall: Duration) -> Self {
        let mut sorted = latencies.to_vec();
        sorted.sort_unstable();
        let pick = |q: f64| sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)];
        Self {
            per_second: items as f64 / wall.as_secs_f64(),
            p50_ms: pick(0.50).as_secs_f64() * 1e3,
            p99_ms: pick(0.99).as_secs_f64() * 1e3,
        }
    }
}

/// The count in environment variable `name`, if set; a value that is not a count stops the
/// benchmark rather than falling back to a default unnoticed.
pub fn setting(name: &str) -> Option<usize> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, not {value:?}")),
    )
}
