//! `flotilla keyset push` and `keyset status`: the publisher key sets a control plane trusts.

use std::path::Path;

use anyhow::Result;
use reqwest::blocking::Body;
use serde_json::Value;

use super::table::{short_hex, Table};
use super::{emit, print_json, Client, RemoteArgs};

/// Pushes a signed key set; the server checks that it follows the one it trusts and sends the
/// chain to every agent.
pub(in crate::cli) fn push(
    file: &Path,
    force: bool,
    remote: &RemoteArgs,
    as_json: bool,
) -> Result<()> {
    let signed = crate::cli::keyset::read(file)?;
    let client = Client::new(remote)?;
    let query = if force {
        vec![("force", "true".to_owned())]
    } else {
        Vec::new()
    };
    let answer = client.post_bytes(&["api", "v1", "trust"], &query, Body::from(signed.encode()))?;
    if as_json {
        return print_json(&answer.json);
    }
    emit(&format!(
        "key set {} is trusted now; agents follow it as they hear of it\n{}",
        answer.json["version"],
        describe(&answer.json)
    ))
}

/// Shows the key set trusted now, the chain, and agents that have not caught up.
pub(in crate::cli) fn status(remote: &RemoteArgs, as_json: bool) -> Result<()> {
    let answer = Client::new(remote)?.get(&["api", "v1", "trust"], &[])?;
    if as_json {
        return print_json(&answer.json);
    }
    emit(&describe(&answer.json))
}

fn describe(trust: &Value) -> String {
    let Some(version) = trust["version"].as_u64() else {
        return "the server trusts no publisher key ([trust] publishers in its config)\n".into();
    };
    let mut text = format!(
        "trusted: key set {version}, threshold {} of:\n",
        trust["threshold"]
    );
    for key in trust["publishers"].as_array().into_iter().flatten() {
        text.push_str(&format!("  {}\n", key["id"].as_str().unwrap_or("?")));
    }
    text.push_str(&format!(
        "control-plane key: {}\n",
        trust["control_plane"].as_str().unwrap_or("?")
    ));
    let chain = trust["key_sets"].as_array().cloned().unwrap_or_default();
    if !chain.is_empty() {
        text.push_str("key sets kept (what every desired state carries):\n");
        let mut table = Table::new(&[
            "VERSION",
            "KEYS",
            "THRESHOLD",
            "CONTROL-PLANE KEY",
            "RESETS FLOORS",
        ]);
        for set in &chain {
            let floors = set["reset_floors"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(model, floor)| format!("{model}={floor}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            table.row(vec![
                set["version"].to_string(),
                set["publishers"].as_array().map_or(0, Vec::len).to_string(),
                set["threshold"].to_string(),
                set["control_plane"]
                    .as_str()
                    .map_or_else(|| "-".to_owned(), |id| short_hex(id).to_owned()),
                if floors.is_empty() {
                    "-".into()
                } else {
                    floors
                },
            ]);
        }
        text.push_str(&table.render("  "));
    }
    let behind = trust["behind"].as_array().cloned().unwrap_or_default();
    if behind.is_empty() {
        text.push_str("every agent reports this key set\n");
    } else {
        text.push_str(&format!(
            "{} agent(s) report an older key set:\n",
            behind.len()
        ));
        let mut table = Table::new(&["AGENT", "KEY SET", "PRESENCE"]);
        for agent in &behind {
            let key_set = match agent["key_set"].as_u64() {
                Some(0) | None => "not reported".to_owned(),
                Some(n) => n.to_string(),
            };
            table.row(vec![
                agent["agent"].as_str().unwrap_or("?").to_owned(),
                key_set,
                if agent["online"].as_bool() == Some(true) {
                    "online".into()
                } else {
                    "offline".into()
                },
            ]);
        }
        text.push_str(&table.render("  "));
    }
    let forked = trust["forked"].as_array().cloned().unwrap_or_default();
    if !forked.is_empty() {
        text.push_str(&format!(
            "{} agent(s) trust a key set this server did not issue (another chain):\n",
            forked.len()
        ));
        let mut table = Table::new(&["AGENT", "KEY SET", "THEIRS", "OURS", "PRESENCE"]);
        for agent in &forked {
            let digest = |field: &str| short_hex(agent[field].as_str().unwrap_or("?")).to_owned();
            table.row(vec![
                agent["agent"].as_str().unwrap_or("?").to_owned(),
                agent["key_set"].to_string(),
                digest("reported"),
                digest("expected"),
                if agent["online"].as_bool() == Some(true) {
                    "online".into()
                } else {
                    "offline".into()
                },
            ]);
        }
        text.push_str(&table.render("  "));
    }
    text
}
