//! Columns in the style of `kubectl get`: upper-case headers, left-aligned,
//! three spaces apart, no trailing blanks.

use chrono::{DateTime, Utc};

/// `headers` over `rows`; a row shorter than the headers leaves the rest empty.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let cell = |row: &[String], i: usize| row.get(i).map(String::as_str).unwrap_or("").to_string();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, width) in widths.iter_mut().enumerate() {
            *width = (*width).max(cell(row, i).chars().count());
        }
    }
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, width) in widths.iter().enumerate() {
            let text = cell(row, i);
            line.push_str(&text);
            if i + 1 < widths.len() {
                line.push_str(&" ".repeat(width - text.chars().count() + 3));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// How long ago `then` was, as kubectl prints ages: `45s`, `12m`, `5h`, `9d`.
pub fn age(then: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let seconds = (now - then).num_seconds().max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 120 * 60 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// A time as status shows it: RFC 3339 in UTC, to the second.
pub fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn columns_align_to_the_widest_cell() {
        let rows = vec![vec!["43".to_string(), "AwaitingApproval".to_string(), "1200".to_string()], vec!["7".to_string()]];
        assert_eq!(
            table(&["VERSION", "STATE", "MEMBERS"], &rows),
            "VERSION   STATE              MEMBERS\n\
             43        AwaitingApproval   1200\n\
             7\n"
        );
    }

    #[test]
    fn ages_read_like_kubectl() {
        let now = Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap();
        let ago = |s: i64| age(now - chrono::Duration::seconds(s), now);
        assert_eq!([ago(-5), ago(45), ago(12 * 60), ago(5 * 3600), ago(9 * 86_400)], ["0s", "45s", "12m", "5h", "9d"]);
        assert_eq!(time(now), "2026-03-02T10:00:00Z");
    }
}
