//! Aligned text tables and the small formatters the remote verbs share.

use std::time::{Duration, UNIX_EPOCH};

/// Rows under a header, each column as wide as its widest cell; the last column is not
/// padded so lines carry no trailing spaces.
pub(super) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub(super) fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank and extra cells are dropped.
    pub(super) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as lines of text, each ending in a newline, with `indent` before each.
    pub(super) fn render(&self, indent: &str) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }

        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::from(indent);
            for (index, width) in widths.iter().enumerate() {
                let cell = row.get(index).map_or("", String::as_str);
                if index + 1 == columns {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<width$}  "));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Labels as `k=v,k=v`, in key order.
/// The leading 16 hex digits of a key id or digest, for tables and messages (all of it when
/// shorter).
pub(super) fn short_hex(hex: &str) -> &str {
    hex.get(..16).unwrap_or(hex)
}

pub(super) fn labels(labels: &std::collections::BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// How long ago `then_ms` was, relative to `now_ms`, as `12s ago` or `3h 5m ago`.
pub(super) fn age(then_ms: u64, now_ms: u64) -> String {
    if then_ms > now_ms {
        return "just now".into();
    }
    format!("{} ago", coarse(Duration::from_millis(now_ms - then_ms)))
}

/// A duration rounded to what a person reads: whole seconds, at most two units.
pub(super) fn coarse(duration: Duration) -> String {
    let secs = duration.as_secs();
    let text = humantime::format_duration(Duration::from_secs(secs)).to_string();
    text.split(' ').take(2).collect::<Vec<_>>().join(" ")
}

/// Unix milliseconds as an RFC 3339 time to the second.
pub(super) fn timestamp(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// An optional figure with a fixed number of decimals, or `-`.
pub(super) fn figure(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

/// The current Unix time in milliseconds.
pub(super) fn now_ms() -> u64 {
    crate::server::unix_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell_without_trailing_spaces() {
        let mut table = Table::new(&["ID", "STATE", "NOTE"]);
        table.row(vec!["a".into(), "completed".into(), String::new()]);
        table.row(vec!["longer-id".into(), "wave".into(), "x".into()]);
        assert_eq!(
            table.render(""),
            "ID         STATE      NOTE\na          completed\nlonger-id  wave       x\n"
        );
    }

    #[test]
    fn ages_read_as_at_most_two_units() {
        assert_eq!(age(0, 1_500), "1s ago");
        assert_eq!(age(0, (3 * 3600 + 5 * 60 + 7) * 1000), "3h 5m ago");
        assert_eq!(age(10, 5), "just now");
        assert_eq!(coarse(Duration::ZERO), "0s");
    }
}
