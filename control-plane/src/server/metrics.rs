//! Prometheus metrics of the control plane, served at `GET /metrics`.
//!
//! | name | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | `flotilla_agents` | gauge | presence | agents known, `online` or `offline` |
//! | `flotilla_agents_by_version` | gauge | version | agents by the model they serve (`name@version`, or `none`) |
//! | `flotilla_agents_by_health` | gauge | health | agents by reported health |
//! | `flotilla_agents_by_key_set` | gauge | key_set | agents by the publisher key set version they report (`0`: none yet) |
//! | `flotilla_agents_key_set_forked` | gauge | | agents that trust a key set of a version the server has, with another digest (another chain) |
//! | `flotilla_pending_agents` | gauge | | agents waiting for an admin to accept their key |
//! | `flotilla_trusted_key_set` | gauge | | the key set version the server trusts (0: no publisher key) |
//! | `flotilla_rollouts` | gauge | state | rollouts by state |
//! | `flotilla_rollout_agents` | gauge | rollout, phase | agents of each active rollout by phase |
//! | `flotilla_rollout_wave` | gauge | rollout | index of the wave an active rollout is in |
//! | `flotilla_api_requests_total` | counter | method, route, status | API requests answered |
//! | `flotilla_api_request_duration_seconds` | histogram | route | time to answer |
//! | `flotilla_chunk_bytes_total` | counter | | bundle bytes published to downloaders |
//! | `flotilla_chunk_requests_total` | counter | | chunk requests answered |
//! | `flotilla_held_bundles` | gauge | | bundles held in memory for downloads |
//! | `flotilla_held_bundle_bytes` | gauge | | their bytes |
//! | `flotilla_mqtt_dropped_messages_total` | counter | reason | agent messages dropped (`malformed`, `foreign`, `unauthenticated`, `duplicate`) |
//! | `flotilla_mqtt_connected` | gauge | | 1 while the server's MQTT client is connected |
//!
//! Route labels are axum route templates (`/api/v1/agents/{id}`), never raw paths, so the
//! label sets stay bounded.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::hub::Hub;
use super::mqtt::MqttStats;

/// The `Content-Type` of [`ServerMetrics::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Presence {
    presence: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Version {
    version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabel {
    health: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeySetLabel {
    key_set: u64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutPhase {
    rollout: String,
    phase: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutLabel {
    rollout: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Request {
    method: String,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// Every series the server exports.
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    agents: Family<Presence, Gauge>,
    by_version: Family<Version, Gauge>,
    by_health: Family<HealthLabel, Gauge>,
    by_key_set: Family<KeySetLabel, Gauge>,
    key_set_forked: Gauge,
    pending_agents: Gauge,
    trusted_key_set: Gauge,
    rollouts: Family<State, Gauge>,
    rollout_agents: Family<RolloutPhase, Gauge>,
    rollout_wave: Family<RolloutLabel, Gauge>,
    requests: Family<Request, Counter>,
    durations: Family<Route, Histogram>,
    chunk_bytes: Counter,
    chunk_requests: Counter,
    held_bundles: Gauge,
    held_bundle_bytes: Gauge,
    dropped: Family<Reason, Counter>,
    mqtt_connected: Gauge,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    /// A registry with every series registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let metrics = Self {
            registry: Registry::default(),
            agents: Family::default(),
            by_version: Family::default(),
            by_health: Family::default(),
            by_key_set: Family::default(),
            key_set_forked: Gauge::default(),
            pending_agents: Gauge::default(),
            trusted_key_set: Gauge::default(),
            rollouts: Family::default(),
            rollout_agents: Family::default(),
            rollout_wave: Family::default(),
            requests: Family::default(),
            durations: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            chunk_bytes: Counter::default(),
            chunk_requests: Counter::default(),
            held_bundles: Gauge::default(),
            held_bundle_bytes: Gauge::default(),
            dropped: Family::default(),
            mqtt_connected: Gauge::default(),
        };
        registry.register(
            "flotilla_agents",
            "Agents known, by presence",
            metrics.agents.clone(),
        );
        registry.register(
            "flotilla_agents_by_version",
            "Agents by the model version they serve",
            metrics.by_version.clone(),
        );
        registry.register(
            "flotilla_agents_by_health",
            "Agents by reported health",
            metrics.by_health.clone(),
        );
        registry.register(
            "flotilla_agents_by_key_set",
            "Agents by the publisher key set version they report",
            metrics.by_key_set.clone(),
        );
        registry.register(
            "flotilla_agents_key_set_forked",
            "Agents that trust a key set of a version the server has, with another digest",
            metrics.key_set_forked.clone(),
        );
        registry.register(
            "flotilla_pending_agents",
            "Agents waiting for an admin to accept their key",
            metrics.pending_agents.clone(),
        );
        registry.register(
            "flotilla_trusted_key_set",
            "Version of the publisher key set the server trusts",
            metrics.trusted_key_set.clone(),
        );
        registry.register(
            "flotilla_rollouts",
            "Rollouts by state",
            metrics.rollouts.clone(),
        );
        registry.register(
            "flotilla_rollout_agents",
            "Agents of each active rollout by phase",
            metrics.rollout_agents.clone(),
        );
        registry.register(
            "flotilla_rollout_wave",
            "Index of the wave an active rollout is in",
            metrics.rollout_wave.clone(),
        );
        registry.register(
            "flotilla_api_requests",
            "API requests answered",
            metrics.requests.clone(),
        );
        registry.register(
            "flotilla_api_request_duration_seconds",
            "Time to answer an API request",
            metrics.durations.clone(),
        );
        registry.register(
            "flotilla_chunk_bytes",
            "Bundle bytes published to downloaders",
            metrics.chunk_bytes.clone(),
        );
        registry.register(
            "flotilla_chunk_requests",
            "Chunk requests answered",
            metrics.chunk_requests.clone(),
        );
        registry.register(
            "flotilla_held_bundles",
            "Bundles held in memory for downloads",
            metrics.held_bundles.clone(),
        );
        registry.register(
            "flotilla_held_bundle_bytes",
            "Bytes of the bundles held in memory for downloads",
            metrics.held_bundle_bytes.clone(),
        );
        registry.register(
            "flotilla_mqtt_dropped_messages",
            "Agent messages dropped, by reason",
            metrics.dropped.clone(),
        );
        registry.register(
            "flotilla_mqtt_connected",
            "1 while the server's MQTT client is connected",
            metrics.mqtt_connected.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// Records one answered API request.
    pub fn observe_request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&Request {
                method: method.to_owned(),
                route: route.to_owned(),
                status,
            })
            .inc();
        self.durations
            .get_or_create(&Route {
                route: route.to_owned(),
            })
            .observe(seconds);
    }

    /// Refreshes the state-derived series from the hub and the MQTT counters, then renders
    /// the text format.
    pub fn render(&self, hub: &Hub, mqtt: &MqttStats) -> String {
        self.refresh(hub, mqtt);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("invariant: writing to a String cannot fail");
        out
    }

    fn refresh(&self, hub: &Hub, mqtt: &MqttStats) {
        let mut presence = BTreeMap::from([("online", 0i64), ("offline", 0i64)]);
        let mut versions: BTreeMap<String, i64> = BTreeMap::new();
        let mut health: BTreeMap<&str, i64> = BTreeMap::new();
        let mut key_sets: BTreeMap<u64, i64> = BTreeMap::new();
        let mut forked = 0i64;
        for agent in hub.all_agents() {
            *key_sets.entry(agent.key_set).or_default() += 1;
            forked += i64::from(hub.key_set_fork(agent).is_some());
            *presence
                .entry(if agent.online { "online" } else { "offline" })
                .or_default() += 1;
            *versions.entry(agent.version_label()).or_default() += 1;
            *health.entry(agent.health_label()).or_default() += 1;
        }
        self.agents.clear();
        for (p, n) in presence {
            self.agents
                .get_or_create(&Presence {
                    presence: p.to_owned(),
                })
                .set(n);
        }
        self.by_version.clear();
        for (version, n) in versions {
            self.by_version.get_or_create(&Version { version }).set(n);
        }
        self.by_health.clear();
        for (h, n) in health {
            self.by_health
                .get_or_create(&HealthLabel {
                    health: h.to_owned(),
                })
                .set(n);
        }

        self.by_key_set.clear();
        for (key_set, n) in key_sets {
            self.by_key_set
                .get_or_create(&KeySetLabel { key_set })
                .set(n);
        }
        self.key_set_forked.set(forked);
        self.pending_agents.set(hub.pending_count() as i64);
        let trusted = hub.trust().0.map_or(0, |k| k.version());
        self.trusted_key_set
            .set(i64::try_from(trusted).unwrap_or(i64::MAX));

        self.rollouts.clear();
        self.rollout_agents.clear();
        self.rollout_wave.clear();
        for rollout in hub.rollouts() {
            self.rollouts
                .get_or_create(&State {
                    state: rollout.state().name().to_owned(),
                })
                .inc();
            if !rollout.is_active() {
                continue;
            }
            let mut phases: BTreeMap<String, i64> = BTreeMap::new();
            for (_, status) in rollout.agents() {
                *phases
                    .entry(super::api::phase_name(&status.phase).to_owned())
                    .or_default() += 1;
            }
            for (phase, n) in phases {
                self.rollout_agents
                    .get_or_create(&RolloutPhase {
                        rollout: rollout.id().to_owned(),
                        phase,
                    })
                    .set(n);
            }
            if let Some(index) = super::api::wave_index(rollout.state()) {
                self.rollout_wave
                    .get_or_create(&RolloutLabel {
                        rollout: rollout.id().to_owned(),
                    })
                    .set(index as i64);
            }
        }

        let dropped = hub.dropped();
        for (reason, count) in [
            (
                "malformed",
                dropped.malformed + mqtt.malformed_requests.load(Ordering::Relaxed),
            ),
            ("foreign", dropped.foreign),
            ("unauthenticated", dropped.unauthenticated),
            ("duplicate", dropped.duplicate),
        ] {
            let counter = self.dropped.get_or_create(&Reason { reason });
            counter.inc_by(count.saturating_sub(counter.get()));
        }
        let bytes = mqtt.chunk_bytes.load(Ordering::Relaxed);
        self.chunk_bytes
            .inc_by(bytes.saturating_sub(self.chunk_bytes.get()));
        let requests = mqtt.chunk_requests.load(Ordering::Relaxed);
        self.chunk_requests
            .inc_by(requests.saturating_sub(self.chunk_requests.get()));
        let gauge = |stat: &std::sync::atomic::AtomicU64| {
            i64::try_from(stat.load(Ordering::Relaxed)).unwrap_or(i64::MAX)
        };
        self.held_bundles.set(gauge(&mqtt.held_bundles));
        self.held_bundle_bytes.set(gauge(&mqtt.held_bytes));
        self.mqtt_connected
            .set(i64::from(mqtt.connected.load(Ordering::SeqCst)));
    }
}
