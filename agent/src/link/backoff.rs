//! Reconnect delays: exponential ceilings with full jitter, reset by a connection that held.

use std::time::Duration;

use rand::Rng;

/// How long to wait between connection attempts.
///
/// Each delay is drawn uniformly from zero to a ceiling ("full jitter"), so a fleet that lost
/// its broker at the same instant does not come back at the same instant. The ceiling starts at
/// `initial` and doubles with every failed attempt up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// First ceiling. Default 250 ms.
    pub initial: Duration,
    /// Largest ceiling. Default 30 s.
    pub max: Duration,
    /// A connection that stayed up at least this long starts the schedule over; shorter ones
    /// count as failures, so a broker that accepts and then drops at once is not hammered.
    /// Default 30 s.
    pub stable_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(30),
            stable_after: Duration::from_secs(30),
        }
    }
}

/// The reconnect schedule of one link.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    failures: u32,
}

impl Backoff {
    /// A schedule that has seen no failure yet.
    pub fn new(config: BackoffConfig) -> Self {
        Self {
            config,
            failures: 0,
        }
    }

    /// The ceiling of the next delay: `initial` × 2^failures, at most `max`.
    pub fn ceiling(&self) -> Duration {
        let factor = 2u32.checked_pow(self.failures).unwrap_or(u32::MAX);
        self.config
            .initial
            .saturating_mul(factor)
            .min(self.config.max)
    }

    /// Draws the next delay, uniformly in `[0, ceiling]`, and counts one more failure.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.gen_range(0..=millis))
    }

    /// Records that a connection ended after being up for `up_for`: one that held for
    /// `stable_after` resets the schedule.
    pub fn connection_ended(&mut self, up_for: Duration) {
        if up_for >= self.config.stable_after {
            self.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn ceilings_double_from_250_ms_to_the_30_s_cap() {
        let mut backoff = Backoff::new(BackoffConfig::default());
        let mut rng = StdRng::seed_from_u64(7);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(backoff.ceiling().as_millis());
            backoff.next_delay(&mut rng);
        }
        assert_eq!(
            ceilings,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
    }

    #[test]
    fn ceilings_never_overflow_after_many_failures() {
        let mut backoff = Backoff::new(BackoffConfig::default());
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..200 {
            assert!(backoff.next_delay(&mut rng) <= Duration::from_secs(30));
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(30));
    }

    #[test]
    fn only_a_connection_that_held_resets_the_schedule() {
        let mut backoff = Backoff::new(BackoffConfig::default());
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..4 {
            backoff.next_delay(&mut rng);
        }
        backoff.connection_ended(Duration::from_secs(2));
        assert_eq!(backoff.ceiling(), Duration::from_secs(4));
        backoff.connection_ended(Duration::from_secs(30));
        assert_eq!(backoff.ceiling(), Duration::from_millis(250));
    }

    /// Waits out a schedule on tokio's paused clock: every wait lies within its ceiling, the
    /// jitter spreads the waits instead of always taking the ceiling, and the whole run of ten
    /// attempts is bounded by the sum of the ceilings.
    #[tokio::test(start_paused = true)]
    async fn waits_are_jittered_below_their_ceilings() {
        let mut backoff = Backoff::new(BackoffConfig::default());
        let mut rng = StdRng::seed_from_u64(42);
        let started = tokio::time::Instant::now();
        let mut ceiling_sum = Duration::ZERO;
        let mut below_half = 0;

        for _ in 0..10 {
            let ceiling = backoff.ceiling();
            ceiling_sum += ceiling;
            let before = tokio::time::Instant::now();
            tokio::time::sleep(backoff.next_delay(&mut rng)).await;
            let waited = before.elapsed();
            assert!(
                waited <= ceiling,
                "waited {waited:?} over ceiling {ceiling:?}"
            );
            if waited < ceiling / 2 {
                below_half += 1;
            }
        }

        assert!(started.elapsed() <= ceiling_sum);
        assert!(
            below_half >= 2,
            "jitter looks absent: {below_half} of 10 waits below half"
        );
    }
}
