//! `flotilla agents` (and `agents pending`, `accept`, `forget`) and `flotilla events`: the fleet
//! and the event log.

use std::collections::BTreeMap;
use std::io::BufRead as _;

use anyhow::{bail, Context, Result};
use flotilla_shared::wire::Health;
use serde::Deserialize;

use super::table::{self, Table};
use super::{emit, print_json, Client, RemoteArgs};
use crate::server::store::EventRecord;

/// The parts of the API's agent view the table shows.
#[derive(Debug, Deserialize)]
struct AgentRow {
    id: String,
    online: bool,
    version: String,
    health: Option<Health>,
    labels: BTreeMap<String, String>,
    last_heartbeat_ms: Option<u64>,
    rollout: Option<String>,
}

/// Which agents `flotilla agents` lists.
#[derive(Debug, Clone)]
pub(in crate::cli) struct AgentFilter {
    /// Only those this label selector matches.
    pub selector: Option<String>,
    /// Only those connected (`true`) or not (`false`).
    pub online: Option<bool>,
    /// Agents asked for per request.
    pub page_size: usize,
}

/// Lists agents the filter lets through, asking for them a page at a time.
pub(in crate::cli) fn agents(
    filter: &AgentFilter,
    remote: &RemoteArgs,
    as_json: bool,
) -> Result<()> {
    let client = Client::new(remote)?;
    let mut base: Vec<(&str, String)> = vec![("limit", filter.page_size.to_string())];
    if let Some(selector) = &filter.selector {
        base.push(("selector", selector.clone()));
    }
    if let Some(online) = filter.online {
        base.push(("online", online.to_string()));
    }
    let mut all: Vec<serde_json::Value> = Vec::new();
    loop {
        let mut query = base.clone();
        if let Some(last) = all.last() {
            let id = last["id"]
                .as_str()
                .context("unexpected agent list from the server")?;
            query.push(("after", id.to_owned()));
        }
        let page: Vec<serde_json::Value> = client
            .get(&["api", "v1", "agents"], &query)?
            .parse("agent list")?;
        let last_page = page.len() < filter.page_size;
        all.extend(page);
        if last_page {
            break;
        }
    }
    if as_json {
        return print_json(&serde_json::Value::Array(all));
    }

    let rows: Vec<AgentRow> = serde_json::from_value(serde_json::Value::Array(all))
        .context("unexpected agent list from the server")?;
    if rows.is_empty() {
        let scope = match (filter.selector.is_some(), filter.online) {
            (false, None) => " are known",
            (true, None) => " match the selector",
            (false, Some(true)) => " are online",
            (false, Some(false)) => " are offline",
            (true, Some(true)) => " match the selector and are online",
            (true, Some(false)) => " match the selector and are offline",
        };
        return emit(&format!("no agents{scope}\n"));
    }
    let now = table::now_ms();
    let mut out = Table::new(&[
        "AGENT",
        "ONLINE",
        "VERSION",
        "HEALTH",
        "HEARTBEAT",
        "ROLLOUT",
        "LABELS",
    ]);
    for a in &rows {
        out.row(vec![
            a.id.clone(),
            if a.online { "yes" } else { "no" }.into(),
            a.version.clone(),
            health_label(a.health.as_ref()),
            a.last_heartbeat_ms
                .map_or_else(|| "never".into(), |ms| table::age(ms, now)),
            a.rollout.clone().unwrap_or_else(|| "-".into()),
            table::labels(&a.labels),
        ]);
    }
    emit(&out.render(""))
}

/// Forgets an agent (`flotilla agents forget`).
pub(in crate::cli) fn forget(id: &str, remote: &RemoteArgs) -> Result<()> {
    flotilla_shared::wire::check_agent_id(id).map_err(anyhow::Error::msg)?;
    Client::new(remote)?.delete(&["api", "v1", "agents", id])?;
    emit(&format!("forgot {id}\n"))
}

/// The parts of a pending agent the table shows.
#[derive(Debug, Deserialize)]
struct PendingRow {
    id: String,
    key_id: String,
    registered_key_id: Option<String>,
    approved_key_id: Option<String>,
    labels: BTreeMap<String, String>,
    since_ms: u64,
}

/// Lists agents waiting for acceptance (`flotilla agents pending`).
pub(in crate::cli) fn pending(remote: &RemoteArgs, as_json: bool) -> Result<()> {
    let all: Vec<serde_json::Value> = Client::new(remote)?
        .get(&["api", "v1", "pending-agents"], &[])?
        .parse("pending agent list")?;
    if as_json {
        return print_json(&serde_json::Value::Array(all));
    }
    let rows: Vec<PendingRow> = serde_json::from_value(serde_json::Value::Array(all))
        .context("unexpected pending agent list from the server")?;
    if rows.is_empty() {
        return emit("no agents wait for acceptance\n");
    }
    let now = table::now_ms();
    let mut out = Table::new(&["AGENT", "KEY", "REGISTERED KEY", "WAITING", "LABELS"]);
    for row in &rows {
        let registered = match (&row.registered_key_id, &row.approved_key_id) {
            (Some(key), _) => table::short_hex(key).to_owned(),
            (None, Some(key)) => format!("none; {} approved", table::short_hex(key)),
            (None, None) => "none (new)".into(),
        };
        out.row(vec![
            row.id.clone(),
            row.key_id.clone(),
            registered,
            table::age(row.since_ms, now),
            table::labels(&row.labels),
        ]);
    }
    emit(&out.render(""))
}

/// Lists keys approved ahead (`flotilla agents approved`).
pub(in crate::cli) fn approved(remote: &RemoteArgs, as_json: bool) -> Result<()> {
    let all: Vec<serde_json::Value> = Client::new(remote)?
        .get(&["api", "v1", "approved-agents"], &[])?
        .parse("approved agent list")?;
    if as_json {
        return print_json(&serde_json::Value::Array(all));
    }
    if all.is_empty() {
        return emit("no keys are approved ahead\n");
    }
    let mut out = Table::new(&["AGENT", "KEY"]);
    for row in &all {
        let text = |field: &str| row[field].as_str().unwrap_or("?").to_owned();
        out.row(vec![text("id"), text("key_id")]);
    }
    emit(&out.render(""))
}

/// Accepts the key a pending agent offers (`flotilla agents accept`). `key` is the whole key
/// id (a prefix could be matched by a key ground for it): the server registers the agent if it
/// waits with that key, and otherwise approves the key ahead (for a new agent, or a registered
/// agent's replacement device).
pub(in crate::cli) fn accept(id: &str, key: &str, remote: &RemoteArgs) -> Result<()> {
    flotilla_shared::wire::check_agent_id(id).map_err(anyhow::Error::msg)?;
    let key = key.to_ascii_lowercase();
    if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "--key must be the whole key id, 64 hex digits, as `flotilla-agent identity` prints \
             it on the device (`flotilla agents pending` lists what agents offer)"
        );
    }
    let body = serde_json::json!({ "key_id": key });
    let answer = Client::new(remote)?.post_json(
        &["api", "v1", "pending-agents", id, "accept"],
        &[],
        Some(&body),
    )?;
    if answer.status == reqwest::StatusCode::ACCEPTED {
        return emit(&format!(
            "approved {id} ahead with key {}: it registers when it next connects with that key\n",
            table::short_hex(&key)
        ));
    }
    emit(&format!(
        "accepted {id} with key {}\n",
        table::short_hex(&key)
    ))
}

fn health_label(health: Option<&Health>) -> String {
    match health {
        Some(Health::Ok) => "ok".into(),
        Some(Health::Degraded { cause }) => format!("degraded ({cause})"),
        Some(Health::NoModel) => "no_model".into(),
        None => "unknown".into(),
    }
}

/// Which events `flotilla events` asks for.
#[derive(Debug, Clone, Default)]
pub(in crate::cli) struct EventFilter {
    /// Only this agent's.
    pub agent: Option<String>,
    /// Only this rollout's.
    pub rollout: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only after this event id.
    pub after: Option<u64>,
    /// Page size; the server's default (100) when `None`. Not for following.
    pub limit: Option<usize>,
}

impl EventFilter {
    fn query(&self, after: Option<u64>) -> Vec<(&'static str, String)> {
        let mut query = Vec::new();
        let text = [
            ("agent", &self.agent),
            ("rollout", &self.rollout),
            ("kind", &self.kind),
        ];
        for (key, value) in text {
            if let Some(value) = value {
                query.push((key, value.clone()));
            }
        }
        if let Some(after) = after {
            query.push(("after", after.to_string()));
        }
        if let Some(limit) = self.limit {
            query.push(("limit", limit.to_string()));
        }
        query
    }
}

/// A page of the event log as the API sends it.
#[derive(Debug, Deserialize)]
struct EventsPage {
    events: Vec<EventRecord>,
}

/// Prints one page of the event log, or with `follow` every event from `after` (the start of
/// the log by default) on, as the server's event stream sends them, until interrupted.
pub(in crate::cli) fn events(
    filter: &EventFilter,
    follow: bool,
    remote: &RemoteArgs,
    as_json: bool,
) -> Result<()> {
    let client = Client::new(remote)?;
    if follow {
        return follow_events(&client, filter, as_json);
    }
    let answer = client.get(&["api", "v1", "events"], &filter.query(filter.after))?;
    if as_json {
        return print_json(&answer.json);
    }
    let page: EventsPage = answer.parse("event page")?;
    if page.events.is_empty() {
        return emit("no events\n");
    }
    emit(&event_table(&page.events).render(""))
}

/// One line per event as the stream delivers it (JSON lines with `as_json`), no header. The
/// stream ends only when the server stops; then this ends with the error of reconnecting.
fn follow_events(client: &Client, filter: &EventFilter, as_json: bool) -> Result<()> {
    let mut after = filter.after.unwrap_or(0);
    loop {
        let query = filter.query(Some(after));
        let stream = client.stream(&["api", "v1", "events", "stream"], &query)?;
        let mut data = String::new();
        for line in std::io::BufReader::new(stream).lines() {
            let line = line.context("the event stream broke off")?;
            if let Some(value) = line.strip_prefix("data:") {
                data.push_str(value.trim_start());
            } else if line.is_empty() && !data.is_empty() {
                let event: EventRecord = serde_json::from_str(&std::mem::take(&mut data))
                    .context("unexpected event from the server")?;
                after = event.id;
                emit(&(event_line(&event, as_json)? + "\n"))?;
            }
        }
    }
}

fn event_table(events: &[EventRecord]) -> Table {
    let mut out = Table::new(&["ID", "TIME", "KIND", "AGENT", "ROLLOUT", "MESSAGE"]);
    for e in events {
        out.row(event_cells(e));
    }
    out
}

fn event_cells(e: &EventRecord) -> Vec<String> {
    vec![
        e.id.to_string(),
        table::timestamp(e.at_ms),
        e.kind.clone(),
        e.agent.clone().unwrap_or_else(|| "-".into()),
        e.rollout.clone().unwrap_or_else(|| "-".into()),
        e.message.clone(),
    ]
}

fn event_line(e: &EventRecord, as_json: bool) -> Result<String> {
    if as_json {
        return Ok(serde_json::to_string(e)?);
    }
    Ok(event_cells(e).join("  "))
}
