//! `flotilla bundle push` and `bundle list`: bundles held by the control plane.

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::blocking::Body;
use reqwest::StatusCode;

use super::table::{self, Table};
use super::{emit, print_json, Client, RemoteArgs};
use crate::server::store::BundleRecord;

/// Uploads a bundle file as it is; the server verifies it against its trusted publishers.
pub(in crate::cli) fn push(file: &Path, remote: &RemoteArgs, as_json: bool) -> Result<()> {
    let client = Client::new(remote)?;
    let reader =
        File::open(file).with_context(|| format!("cannot open bundle {}", file.display()))?;
    let size = reader
        .metadata()
        .with_context(|| format!("cannot read the size of {}", file.display()))?
        .len();
    // Ask first what the token may upload: a server refusing an upload answers before reading
    // the body and closes the connection, which a client mid-upload sees as a broken pipe
    // rather than the server's reason.
    let caller = client.get(&["api", "v1", "whoami"], &[])?;
    if !matches!(caller.json["role"].as_str(), Some("operator" | "admin")) {
        anyhow::bail!(
            "token {} has role {}; uploading bundles needs operator",
            caller.json["name"],
            caller.json["role"].as_str().unwrap_or("unknown")
        );
    }
    if let Some(limit) = caller.json["max_upload_bytes"].as_u64() {
        if size > limit {
            anyhow::bail!(
                "{} is {size} bytes, over the server's upload limit of {limit} bytes \
                 (`max_upload_bytes` in its config)",
                file.display()
            );
        }
    }

    // indicatif draws on standard error and stays hidden when that is not a terminal.
    let bar = ProgressBar::new(size);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} uploading {bytes:>10}/{total_bytes} {wide_bar} {bytes_per_sec} {eta}",
        )
        .expect("static template"),
    );
    let answer = client.post_bytes(
        &["api", "v1", "bundles"],
        &[],
        Body::sized(bar.wrap_read(reader), size),
    );
    bar.finish_and_clear();
    let answer = answer?;

    if as_json {
        return print_json(&answer.json);
    }
    let record: BundleRecord = answer.parse("bundle record")?;
    let outcome = if answer.status == StatusCode::CREATED {
        "uploaded (new)"
    } else {
        "already held (unchanged)"
    };
    emit(&format!(
        "{}@{} {outcome}\ndigest  sha256:{}\nsize    {} bytes, {} chunks, sequence {}\n",
        record.name,
        record.version,
        record.digest.to_hex(),
        record.size,
        record.chunks,
        record.sequence
    ))
}

/// Lists the bundles the server holds, newest first.
pub(in crate::cli) fn list(remote: &RemoteArgs, as_json: bool) -> Result<()> {
    let client = Client::new(remote)?;
    let answer = client.get(&["api", "v1", "bundles"], &[])?;
    if as_json {
        return print_json(&answer.json);
    }

    let records: Vec<BundleRecord> = answer.parse("bundle list")?;
    if records.is_empty() {
        return emit("no bundles held; upload one with `flotilla bundle push FILE`\n");
    }
    let now = table::now_ms();
    let mut out = Table::new(&[
        "BUNDLE", "DIGEST", "SEQ", "SIZE", "TASK", "BACKENDS", "EXPIRES", "UPLOADED",
    ]);
    for r in &records {
        out.row(vec![
            format!("{}@{}", r.name, r.version),
            r.digest.short(),
            r.sequence.to_string(),
            r.size.to_string(),
            r.task.clone(),
            r.backends.join(","),
            table::timestamp(r.expires_at.saturating_mul(1000)),
            table::age(r.uploaded_ms, now),
        ]);
    }
    emit(&out.render(""))
}
