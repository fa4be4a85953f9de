//! `flotilla backup`: a running server's state, downloaded and checked before it is kept.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::{emit, Client, RemoteArgs};
use crate::server::backup;

/// Downloads a backup to `out`. It is written beside `out` first and takes its place only once
/// the whole file has checked out, so an interrupted download never passes for a backup and an
/// older backup at `out` survives until then.
pub(in crate::cli) fn download(out: &Path, remote: &RemoteArgs) -> Result<()> {
    let client = Client::new(remote)?;
    let dir = match out.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let partial = tempfile::Builder::new()
        .prefix(".flotilla-backup-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;

    // The size is not known before the end; indicatif stays hidden off a terminal.
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} downloading the backup {bytes} {bytes_per_sec}")
            .expect("static template"),
    );
    let mut writer = BufWriter::new(bar.wrap_write(partial.as_file()));
    let copied = client.download(&["api", "v1", "backup"], &mut writer);
    bar.finish_and_clear();
    copied?;
    writer
        .flush()
        .with_context(|| format!("cannot write {}", partial.path().display()))?;
    drop(writer);

    let reader = BufReader::new(File::open(partial.path())?);
    let summary = backup::read(reader, |_| Ok(()))
        .context("the server's backup did not check out; nothing was kept")?;
    partial
        .as_file()
        .sync_all()
        .with_context(|| format!("cannot write {}", partial.path().display()))?;
    let size = partial.as_file().metadata()?.len();
    partial
        .persist(out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    emit(&format!(
        "backed up {summary}\nto {} ({size} bytes)\n",
        out.display()
    ))
}
