//! Deterministic cohorts: which agents go into which wave.
//!
//! Every agent gets a position from SHA-256 over the rollout id and its agent id, so the same
//! rollout always cuts the fleet the same way (a restarted server recomputes nothing it could
//! get wrong) and a different rollout picks different canaries. With a stratification key,
//! each wave takes a share of every stratum: one agent of each stratum first when the wave is
//! large enough, then the remaining seats in proportion to what each stratum has left.

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};

use super::spec::{WaveSize, WaveSpec};

/// One candidate for a rollout: its id and the value of the stratification label, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// Agent id.
    pub agent: &'a str,
    /// Value of the stratification label; `None` when not stratifying or the label is absent.
    pub stratum: Option<&'a str>,
}

/// The position of `item` in rollout `rollout`'s order: SHA-256 of both, length-prefixed so
/// no two different pairs hash the same input.
pub fn order_key(rollout: &str, item: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"flotilla.rollout.cohort.v1");
    for part in [rollout, item] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().into()
}

/// How many agents each wave takes out of `total`. Percentages round up; every wave but the
/// last takes at least one agent while any remain; the last takes the rest. Waves that would
/// be empty because earlier ones used up every target are left off the end.
pub fn wave_sizes(total: usize, waves: &[WaveSpec]) -> Vec<usize> {
    let mut sizes = Vec::with_capacity(waves.len());
    let mut remaining = total;
    for (i, wave) in waves.iter().enumerate() {
        if remaining == 0 {
            break;
        }
        let is_last = i + 1 == waves.len();
        let wanted = match wave.size {
            _ if is_last => remaining,
            WaveSize::Count(n) => n as usize,
            // The tolerance stops a product that lands a rounding error above a whole number
            // from taking one agent more.
            WaveSize::Percent(p) => (total as f64 * p / 100.0 - 1e-9).ceil() as usize,
        };
        let size = wanted.clamp(1, remaining);
        sizes.push(size);
        remaining -= size;
    }
    sizes
}

/// Splits `candidates` into waves for rollout `rollout`. Each wave lists its agents in the
/// rollout's hash order. The result has at most `waves.len()` entries, none empty.
pub fn assign(rollout: &str, candidates: &[Candidate<'_>], waves: &[WaveSpec]) -> Vec<Vec<String>> {
    let sizes = wave_sizes(candidates.len(), waves);

    let mut by_stratum: BTreeMap<Option<&str>, Vec<&str>> = BTreeMap::new();
    for candidate in candidates {
        by_stratum
            .entry(candidate.stratum)
            .or_default()
            .push(candidate.agent);
    }
    let mut strata: Vec<Stratum<'_>> = by_stratum
        .into_iter()
        .map(|(value, mut agents)| {
            agents.sort_by_key(|agent| (order_key(rollout, agent), *agent));
            agents.dedup();
            Stratum {
                order: order_key(rollout, &stratum_name(value)),
                agents,
                taken: 0,
            }
        })
        .collect();
    // Tie-breaks between strata follow the rollout's hash order too, not the label's spelling.
    strata.sort_by_key(|s| s.order);

    sizes
        .into_iter()
        .map(|size| {
            let quotas = quotas(&strata, size);
            let mut wave: Vec<&str> = Vec::with_capacity(size);
            for (stratum, quota) in strata.iter_mut().zip(quotas) {
                wave.extend(&stratum.agents[stratum.taken..stratum.taken + quota]);
                stratum.taken += quota;
            }
            wave.sort_by_key(|agent| (order_key(rollout, agent), *agent));
            wave.into_iter().map(str::to_owned).collect()
        })
        .collect()
}

/// The hash input naming a stratum; the missing label hashes apart from every value.
fn stratum_name(value: Option<&str>) -> String {
    match value {
        Some(v) => format!("stratum={v}"),
        None => "stratum-absent".to_owned(),
    }
}

struct Stratum<'a> {
    order: [u8; 32],
    agents: Vec<&'a str>,
    taken: usize,
}

impl Stratum<'_> {
    fn left(&self) -> usize {
        self.agents.len() - self.taken
    }
}

/// How many agents each stratum gives a wave of `size`: one from every stratum with agents
/// left (the largest first when there are more strata than seats), then the other seats by
/// largest remainder in proportion to what each has left. The quotas add up to `size` as
/// long as that many agents are left, which [`wave_sizes`] guarantees.
fn quotas(strata: &[Stratum<'_>], size: usize) -> Vec<usize> {
    let mut quota = vec![0usize; strata.len()];

    let mut open: Vec<usize> = (0..strata.len())
        .filter(|&i| strata[i].left() > 0)
        .collect();
    // Stable sort: equal sizes keep the hash order.
    open.sort_by_key(|&i| std::cmp::Reverse(strata[i].left()));
    for &i in open.iter().take(size) {
        quota[i] = 1;
    }
    let mut seats = size.saturating_sub(open.len());
    if seats == 0 {
        return quota;
    }

    let spare: Vec<usize> = strata
        .iter()
        .zip(&quota)
        .map(|(s, q)| s.left() - q)
        .collect();
    let spare_total: usize = spare.iter().sum();
    if spare_total == 0 {
        return quota;
    }
    let mut remainders = Vec::with_capacity(strata.len());
    for (i, &cap) in spare.iter().enumerate() {
        let exact = seats as f64 * cap as f64 / spare_total as f64;
        let whole = (exact.floor() as usize).min(cap);
        quota[i] += whole;
        remainders.push((exact - whole as f64, i));
    }
    let given: usize = quota.iter().sum();
    seats = size.saturating_sub(given);

    // Largest remainder first; equal remainders in hash order. The last pass only matters if
    // floating-point rounding left a seat over, so a wave never comes out short.
    remainders.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let by_remainder: Vec<usize> = remainders.into_iter().map(|(_, i)| i).collect();
    for i in by_remainder.iter().copied().chain(0..strata.len()) {
        if seats == 0 {
            break;
        }
        if quota[i] < strata[i].left() {
            quota[i] += 1;
            seats -= 1;
        }
    }
    quota
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waves(sizes: &[WaveSize]) -> Vec<WaveSpec> {
        sizes
            .iter()
            .map(|&size| WaveSpec { size, bake_secs: 0 })
            .collect()
    }

    fn fleet(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("edge-{i:03}")).collect()
    }

    fn plain(agents: &[String]) -> Vec<Candidate<'_>> {
        agents
            .iter()
            .map(|agent| Candidate {
                agent,
                stratum: None,
            })
            .collect()
    }

    #[test]
    fn wave_sizes_round_percentages_up_and_give_the_rest_to_the_last_wave() {
        let spec = waves(&[
            WaveSize::Percent(1.0),
            WaveSize::Count(5),
            WaveSize::Percent(10.0),
        ]);
        assert_eq!(wave_sizes(50, &spec), vec![1, 5, 44]);
        assert_eq!(wave_sizes(200, &spec), vec![2, 5, 193]);
    }

    #[test]
    fn wave_sizes_drop_waves_once_targets_run_out() {
        let spec = waves(&[
            WaveSize::Count(3),
            WaveSize::Count(3),
            WaveSize::Percent(50.0),
        ]);
        assert_eq!(wave_sizes(4, &spec), vec![3, 1]);
        assert_eq!(wave_sizes(2, &spec), vec![2]);
        assert_eq!(wave_sizes(0, &spec), Vec::<usize>::new());
    }

    #[test]
    fn wave_sizes_give_every_wave_at_least_one_agent_while_any_remain() {
        let spec = waves(&[
            WaveSize::Percent(0.001),
            WaveSize::Percent(0.001),
            WaveSize::Count(1),
        ]);
        assert_eq!(wave_sizes(3, &spec), vec![1, 1, 1]);
    }

    #[test]
    fn same_inputs_give_the_same_cohorts() {
        let agents = fleet(40);
        let spec = waves(&[
            WaveSize::Count(4),
            WaveSize::Percent(25.0),
            WaveSize::Percent(100.0),
        ]);
        let a = assign("r-1", &plain(&agents), &spec);
        let mut reversed = plain(&agents);
        reversed.reverse();
        let b = assign("r-1", &reversed, &spec);
        assert_eq!(a, b, "input order must not matter");
        assert_eq!(a.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 10, 26]);

        let mut all: Vec<String> = a.concat();
        all.sort();
        assert_eq!(all, agents, "every agent exactly once");
    }

    #[test]
    fn different_rollout_ids_pick_different_canaries() {
        let agents = fleet(40);
        let spec = waves(&[WaveSize::Count(4), WaveSize::Percent(100.0)]);
        let a = assign("r-1", &plain(&agents), &spec);
        let b = assign("r-2", &plain(&agents), &spec);
        assert_ne!(a[0], b[0]);
    }

    #[test]
    fn order_key_separates_its_inputs() {
        assert_ne!(order_key("ab", "c"), order_key("a", "bc"));
        assert_eq!(order_key("r", "a"), order_key("r", "a"));
    }

    #[test]
    fn stratification_puts_every_stratum_in_every_wave_when_sizes_allow() {
        let agents = fleet(30);
        let hw = |i: usize| match i % 10 {
            0..=5 => "orin",
            6..=8 => "xavier",
            _ => "nano",
        };
        let candidates: Vec<Candidate<'_>> = agents
            .iter()
            .enumerate()
            .map(|(i, agent)| Candidate {
                agent,
                stratum: Some(hw(i)),
            })
            .collect();
        let spec = waves(&[
            WaveSize::Count(3),
            WaveSize::Count(10),
            WaveSize::Percent(100.0),
        ]);
        let cohorts = assign("r-strat", &candidates, &spec);
        assert_eq!(
            cohorts.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![3, 10, 17]
        );

        let stratum_of = |agent: &str| {
            let i: usize = agent.trim_start_matches("edge-").parse().unwrap();
            hw(i)
        };
        for (w, cohort) in cohorts.iter().enumerate() {
            let mut counts = BTreeMap::new();
            for agent in cohort {
                *counts.entry(stratum_of(agent)).or_insert(0) += 1;
            }
            assert_eq!(counts.len(), 3, "wave {w} misses a stratum: {counts:?}");
            if w == 1 {
                // 18 orin, 9 xavier, 3 nano: after the canary's one of each, ten seats split
                // 17:8:2 of what is left.
                assert_eq!(
                    counts,
                    BTreeMap::from([("nano", 1), ("orin", 6), ("xavier", 3)])
                );
            }
        }
    }

    #[test]
    fn stratification_prefers_the_largest_strata_when_a_wave_is_too_small_for_all() {
        let agents = fleet(12);
        let candidates: Vec<Candidate<'_>> = agents
            .iter()
            .enumerate()
            .map(|(i, agent)| Candidate {
                agent,
                stratum: match i {
                    0..=7 => Some("orin"),
                    8..=10 => Some("xavier"),
                    _ => None,
                },
            })
            .collect();
        let spec = waves(&[WaveSize::Count(2), WaveSize::Percent(100.0)]);
        let cohorts = assign("r-small", &candidates, &spec);
        let canaries: Vec<usize> = cohorts[0]
            .iter()
            .map(|a| a.trim_start_matches("edge-").parse().unwrap())
            .collect();
        assert!(canaries.iter().any(|&i| i <= 7), "{canaries:?}");
        assert!(
            canaries.iter().any(|&i| (8..=10).contains(&i)),
            "{canaries:?}"
        );
        assert_eq!(cohorts[1].len(), 10);
    }
}
