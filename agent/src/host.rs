//! Host facts for the birth message and the agent's own resource use for heartbeats.
//!
//! Everything is read from `std` and `/proc` without extra crates or `unsafe`. On systems
//! without `/proc` (anything but Linux) the values that come from it are zero and GPU presence
//! is `false`; the architecture and core count still come from `std`.

use std::path::Path;
use std::time::Instant;

use flotilla_shared::manifest::Backend;
use flotilla_shared::wire::{Capabilities, HostMetrics};

/// Clock ticks per second behind `/proc/self/stat` times. Reading the real value needs
/// `sysconf(_SC_CLK_TCK)`, which is `unsafe` FFI; 100 is what Linux reports on every
/// architecture Flotilla targets.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// Files whose presence means an NVIDIA driver and device are there.
const GPU_MARKERS: [&str; 2] = ["/dev/nvidia0", "/proc/driver/nvidia/version"];

/// Whether an NVIDIA driver and device are present.
pub fn has_gpu() -> bool {
    GPU_MARKERS.iter().any(|marker| Path::new(marker).exists())
}

/// What this host and agent can do, for the birth message. Values that cannot be read are
/// reported as zero (memory) or one (cores) rather than failing the connection.
pub fn capabilities(backends: Vec<Backend>) -> Capabilities {
    let cores = std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1);
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_meminfo_total(&text))
        .unwrap_or(0);

    Capabilities {
        architecture: std::env::consts::ARCH.to_owned(),
        cores,
        memory_bytes,
        gpu: has_gpu(),
        backends,
        agent_version: crate::agent_version().to_string(),
    }
}

/// Samples this process's memory and CPU use; each sample reports CPU since the previous one.
#[derive(Debug)]
pub struct ProcessSampler {
    last_ticks: Option<u64>,
    last_at: Instant,
}

impl Default for ProcessSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessSampler {
    /// Starts measuring now: the first sample covers the time since this call.
    pub fn new() -> Self {
        Self {
            last_ticks: read_cpu_ticks(),
            last_at: Instant::now(),
        }
    }

    /// Resident memory now and CPU use since the previous sample, in percent of one core
    /// (a busy two-threaded process shows about 200). Zero where `/proc` is unavailable.
    pub fn sample(&mut self) -> HostMetrics {
        let now = Instant::now();
        let ticks = read_cpu_ticks();
        let elapsed = now.duration_since(self.last_at).as_secs_f64();

        let cpu_percent = match (self.last_ticks, ticks) {
            (Some(before), Some(after)) if elapsed > 0.0 => {
                let busy = after.saturating_sub(before) as f64 / CLOCK_TICKS_PER_SEC;
                busy / elapsed * 100.0
            }
            _ => 0.0,
        };

        self.last_ticks = ticks;
        self.last_at = now;

        HostMetrics {
            rss_bytes: read_rss_bytes().unwrap_or(0),
            cpu_percent,
        }
    }
}

fn read_cpu_ticks() -> Option<u64> {
    parse_stat_cpu_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// `VmRSS` in `/proc/self/status` is in KiB, so no page size is needed (unlike `statm`).
fn read_rss_bytes() -> Option<u64> {
    parse_status_rss(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    kib_field(meminfo, "MemTotal:")
}

/// `VmRSS` from `/proc/self/status`, in bytes.
fn parse_status_rss(status: &str) -> Option<u64> {
    kib_field(status, "VmRSS:")
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    kib.checked_mul(1024)
}

/// User plus system time (fields 14 and 15) from `/proc/self/stat`. The command name in field 2
/// may hold spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    let mut fields = after_name.split_whitespace();
    // After the name come state (field 3) ... utime (14), stime (15): skip fields 3 to 13.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_are_found_after_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (flotilla (a) b) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 \
                    9 0 123456 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(325));
    }

    #[test]
    fn truncated_stat_is_unreadable_not_a_panic() {
        assert_eq!(parse_stat_cpu_ticks("4242 (agent) S 1 2 3"), None);
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn kib_fields_are_converted_to_bytes() {
        let meminfo = "MemTotal:       16318484 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_meminfo_total(meminfo), Some(16_318_484 * 1024));
        let status = "Name:\tagent\nVmRSS:\t   5120 kB\n";
        assert_eq!(parse_status_rss(status), Some(5120 * 1024));
        assert_eq!(parse_status_rss("Name:\tagent\n"), None);
        assert_eq!(parse_status_rss("VmRSS:\tlots kB\n"), None);
    }

    #[test]
    fn capabilities_describe_this_host() {
        let caps = capabilities(vec![Backend::Tract]);
        assert_eq!(caps.architecture, std::env::consts::ARCH);
        assert!(caps.cores >= 1);
        assert_eq!(caps.backends, vec![Backend::Tract]);
        if cfg!(target_os = "linux") {
            assert!(caps.memory_bytes > 0);
        }
    }

    #[test]
    fn busy_process_shows_cpu_use_and_resident_memory() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let mut sampler = ProcessSampler::new();
        let start = read_cpu_ticks().unwrap();
        // Spin until the kernel has charged 20 ticks of CPU to this process, however loaded the
        // machine is; the deadline only stops a broken /proc reading from hanging the test.
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        let mut spin = 0u64;
        while read_cpu_ticks().unwrap() < start + 20 && Instant::now() < deadline {
            for _ in 0..100_000 {
                spin = std::hint::black_box(spin.wrapping_add(1));
            }
        }
        let metrics = sampler.sample();
        assert!(metrics.rss_bytes > 0);
        assert!(metrics.cpu_percent > 0.0, "{}", metrics.cpu_percent);
    }
}
