//! Schedule math: parsing, `next_after` / `latest_due`, and their agreement
//! with a brute-force reference across daylight saving changes.

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc, Weekday};
use chrono_tz::Tz;
use proptest::prelude::*;
use segment_core::api::Schedule;
use segment_core::schedule::CronSchedule;

fn t(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

fn cron(text: &str, zone: Option<&str>) -> CronSchedule {
    CronSchedule::from_parts(text, zone).unwrap_or_else(|e| panic!("{text} {zone:?}: {e}"))
}

/// Every time of `cron` in `(from, to]`, by `next_after`.
fn times(cron: &CronSchedule, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    let mut at = from;
    while let Some(next) = cron.next_after(at).filter(|n| *n <= to) {
        assert!(next > at, "next_after({at}) = {next} does not move forward");
        out.push(next);
        at = next;
    }
    out
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

#[test]
fn five_fields_and_macros_parse() {
    for text in
        ["*/30 * * * *", "0 9 * * 1-5", "15 3 1 * *", "0 0 * * SUN", "@hourly", "@daily", "@weekly", "@monthly", "@yearly"]
    {
        assert!(CronSchedule::from_parts(text, None).is_ok(), "{text}");
    }
    let schedule = Schedule {
        cron: " 0 * * * * ".into(),
        time_zone: Some("Europe/Madrid".into()),
        suspend: false,
        concurrency_policy: Default::default(),
        starting_deadline_seconds: None,
    };
    assert!(CronSchedule::parse(&schedule).is_ok(), "surrounding spaces are ignored");
}

#[test]
fn bad_crons_and_zones_name_the_field_and_the_reason() {
    let cases = [
        ("0 0 * * * *", None, "spec.schedule.cron", "has 6 fields"),
        ("0 * * *", None, "spec.schedule.cron", "has 4 fields"),
        ("", None, "spec.schedule.cron", "has 0 fields"),
        ("@reboot", None, "spec.schedule.cron", "@reboot has no meaning"),
        ("61 * * * *", None, "spec.schedule.cron", "is not a valid cron"),
        ("@fortnightly", None, "spec.schedule.cron", "is not a valid cron"),
        ("0 * * * *", Some("Europe/Atlantis"), "spec.schedule.timeZone", "`Europe/Atlantis` is not an IANA time zone"),
        ("0 * * * *", Some("+02:00"), "spec.schedule.timeZone", "is not an IANA time zone"),
    ];
    for (text, zone, field, message) in cases {
        let err = CronSchedule::from_parts(text, zone).err().unwrap_or_else(|| panic!("{text} {zone:?} parsed"));
        assert_eq!(err.field, field, "{text}");
        assert!(err.message.contains(message), "{text}: {}", err.message);
        assert!(err.to_string().starts_with(&format!("{field}: ")), "{err}");
    }
}

#[test]
fn no_zone_and_an_empty_zone_mean_utc() {
    for zone in [None, Some(""), Some("UTC")] {
        assert_eq!(cron("0 9 * * *", zone).next_after(t("2024-03-01T10:00:00Z")), Some(t("2024-03-02T09:00:00Z")));
    }
}

// ---------------------------------------------------------------------------
// next_after and latest_due
// ---------------------------------------------------------------------------

#[test]
fn next_after_is_strictly_after() {
    let c = cron("*/30 * * * *", None);
    assert_eq!(c.next_after(t("2024-03-01T10:00:00Z")), Some(t("2024-03-01T10:30:00Z")));
    assert_eq!(c.next_after(t("2024-03-01T10:29:59.999Z")), Some(t("2024-03-01T10:30:00Z")));
    assert_eq!(c.next_after(t("2024-03-01T10:30:00.001Z")), Some(t("2024-03-01T11:00:00Z")));
    assert_eq!(cron("0 0 29 2 *", None).next_after(t("2024-03-01T00:00:00Z")), Some(t("2028-02-29T00:00:00Z")));
}

#[test]
fn a_cron_that_never_fires_is_rejected_when_parsed() {
    let err = CronSchedule::from_parts("0 0 30 2 *", None).unwrap_err();
    assert_eq!(err.field, "spec.schedule.cron");
    assert!(err.message.contains("never fires"), "{err}");
}

#[test]
fn latest_due_is_the_latest_time_in_a_half_open_window() {
    let c = cron("0 * * * *", None);
    let due = |after: &str, until: &str| c.latest_due(t(after), t(until));
    assert_eq!(due("2024-03-01T10:00:00Z", "2024-03-01T15:20:00Z"), Some(t("2024-03-01T15:00:00Z")));
    assert_eq!(due("2024-03-01T10:00:00Z", "2024-03-01T11:00:00Z"), Some(t("2024-03-01T11:00:00Z")), "until is included");
    assert_eq!(due("2024-03-01T11:00:00Z", "2024-03-01T11:59:59Z"), None, "after is excluded");
    assert_eq!(due("2024-03-01T11:00:00Z", "2024-03-01T11:00:00Z"), None);
    assert_eq!(due("2024-03-01T12:00:00Z", "2024-03-01T11:00:00Z"), None, "an empty window");
    assert_eq!(due("2024-03-01T10:59:59Z", "2024-03-01T11:00:00.5Z"), Some(t("2024-03-01T11:00:00Z")));
}

#[test]
fn zones_move_the_times() {
    // 09:00 on weekdays in New York is 14:00 UTC in winter, 13:00 in summer.
    let c = cron("0 9 * * 1-5", Some("America/New_York"));
    assert_eq!(c.next_after(t("2024-03-01T15:00:00Z")), Some(t("2024-03-04T14:00:00Z")), "Friday afternoon to Monday");
    assert_eq!(c.next_after(t("2024-03-11T00:00:00Z")), Some(t("2024-03-11T13:00:00Z")));
    assert_eq!(cron("@daily", Some("Asia/Kolkata")).next_after(t("2024-03-01T00:00:00Z")), Some(t("2024-03-01T18:30:00Z")));
}

// ---------------------------------------------------------------------------
// Daylight saving changes
// ---------------------------------------------------------------------------

#[test]
fn a_daily_time_in_the_spring_gap_runs_once_right_after_it() {
    // 02:30 does not exist on these days; the run is at the first instant after the gap.
    let cases = [
        ("Europe/Madrid", "2024-03-30T12:00:00Z", ["2024-03-31T01:00:00Z", "2024-04-01T00:30:00Z"]),
        ("America/New_York", "2024-03-09T12:00:00Z", ["2024-03-10T07:00:00Z", "2024-03-11T06:30:00Z"]),
    ];
    for (zone, from, expected) in cases {
        let c = cron("30 2 * * *", Some(zone));
        let got = times(&c, t(from), t(from) + Duration::days(2));
        assert_eq!(got, expected.map(t), "{zone}");
    }
}

#[test]
fn a_daily_time_in_the_repeated_hour_runs_once() {
    let cases = [
        ("30 2 * * *", "Europe/Madrid", "2024-10-26T12:00:00Z", ["2024-10-27T00:30:00Z", "2024-10-28T01:30:00Z"]),
        ("30 1 * * *", "America/New_York", "2024-11-02T12:00:00Z", ["2024-11-03T05:30:00Z", "2024-11-04T06:30:00Z"]),
    ];
    for (text, zone, from, expected) in cases {
        let c = cron(text, Some(zone));
        assert_eq!(times(&c, t(from), t(from) + Duration::days(2)), expected.map(t), "{zone}");
        // Looking from inside the second pass of the hour finds no second run.
        let second_pass = t(expected[0]) + Duration::minutes(70);
        assert_eq!(c.next_after(second_pass), Some(t(expected[1])), "{zone}");
        assert_eq!(c.latest_due(t(expected[0]), second_pass), None, "{zone}");
        assert_eq!(c.latest_due(t(from), second_pass), Some(t(expected[0])), "{zone}");
    }
}

#[test]
fn every_quarter_hour_through_the_repeated_hour_never_repeats_an_instant() {
    let c = cron("*/15 * * * *", Some("Europe/Madrid"));
    // 02:00-02:59 local happens twice: 00:00-00:59 UTC (CEST) and 01:00-01:59 UTC (CET).
    let got = times(&c, t("2024-10-26T23:50:00Z"), t("2024-10-27T02:10:00Z"));
    let expected: Vec<_> = (0..=8).map(|i| t("2024-10-27T00:00:00Z") + Duration::minutes(15 * i)).collect();
    assert_eq!(got, expected);
}

#[test]
fn every_quarter_hour_skips_the_spring_gap() {
    let c = cron("*/15 * * * *", Some("Europe/Madrid"));
    let got = times(&c, t("2024-03-31T00:30:00Z"), t("2024-03-31T01:20:00Z"));
    // 01:45 CET (00:45 UTC), then 03:00 CEST (01:00 UTC): local 02:xx never exists.
    assert_eq!(got, [t("2024-03-31T00:45:00Z"), t("2024-03-31T01:00:00Z"), t("2024-03-31T01:15:00Z")]);
}

/// A pattern with its meaning spelled out, to check the schedule against.
struct Pattern {
    cron: &'static str,
    /// One minute and one hour: runs once a day even when the clock skips
    /// or repeats that time (croner's "fixed-time" jobs, as Vixie cron).
    fixed: bool,
    matches: fn(&NaiveDateTime) -> bool,
}

const PATTERNS: [Pattern; 7] = [
    Pattern { cron: "30 2 * * *", fixed: true, matches: |l| l.hour() == 2 && l.minute() == 30 },
    Pattern { cron: "0 2 * * *", fixed: true, matches: |l| l.hour() == 2 && l.minute() == 0 },
    Pattern { cron: "30 1 * * *", fixed: true, matches: |l| l.hour() == 1 && l.minute() == 30 },
    Pattern { cron: "0 2 * * 0", fixed: true, matches: |l| l.hour() == 2 && l.minute() == 0 && l.weekday() == Weekday::Sun },
    Pattern { cron: "@daily", fixed: true, matches: |l| l.hour() == 0 && l.minute() == 0 },
    Pattern { cron: "*/15 * * * *", fixed: false, matches: |l| l.minute() % 15 == 0 },
    Pattern { cron: "0 * * * *", fixed: false, matches: |l| l.minute() == 0 },
];

/// Zones with a daylight saving change and the instants of two changes.
/// Lord Howe moves by 30 minutes.
const ZONES: [(&str, [&str; 2]); 3] = [
    ("Europe/Madrid", ["2024-03-31T01:00:00Z", "2024-10-27T01:00:00Z"]),
    ("America/New_York", ["2024-03-10T07:00:00Z", "2024-11-03T06:00:00Z"]),
    ("Australia/Lord_Howe", ["2024-04-06T15:00:00Z", "2024-10-05T15:30:00Z"]),
];

/// Every scheduled instant in `[from, to)`, minute by minute: a matching
/// wall clock time runs at each of its instants, except that a fixed-time
/// pattern runs once in a repeated hour (the first pass) and, when its time
/// is skipped, at the first instant after the gap.
fn reference(p: &Pattern, zone: Tz, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    let mut m = from.with_second(0).and_then(|m| m.with_nanosecond(0)).unwrap();
    while m < to {
        let local = m.with_timezone(&zone).naive_local();
        if (p.matches)(&local) {
            let first_pass = match zone.from_local_datetime(&local) {
                LocalResult::Ambiguous(earlier, _) => earlier.with_timezone(&Utc) == m,
                _ => true,
            };
            if first_pass || !p.fixed {
                out.push(m);
            }
        }
        m += Duration::minutes(1);
    }
    if p.fixed {
        let first_day = from.with_timezone(&zone).date_naive() - Duration::days(1);
        let days = (to - from).num_days() + 2;
        for day in (0..=days).map(|d| first_day + Duration::days(d)) {
            if let Some(after_gap) = gap_run(p, zone, day).filter(|at| *at >= m.min(from) && *at < to) {
                out.push(after_gap);
            }
        }
        out.sort();
    }
    out
}

/// For a fixed-time pattern whose time does not exist on `day`: the first
/// instant after the gap.
fn gap_run(p: &Pattern, zone: Tz, day: NaiveDate) -> Option<DateTime<Utc>> {
    let wall = (0..24 * 60).map(|m| day.and_hms_opt(0, 0, 0).unwrap() + Duration::minutes(m)).find(|l| (p.matches)(l))?;
    if zone.from_local_datetime(&wall) != LocalResult::None {
        return None;
    }
    (1..=180)
        .map(|m| wall + Duration::minutes(m))
        .find_map(|l| zone.from_local_datetime(&l).earliest())
        .map(|d| d.with_timezone(&Utc))
}

#[test]
fn schedules_agree_with_the_reference_through_every_change() {
    for (zone_name, changes) in ZONES {
        let zone: Tz = zone_name.parse().unwrap();
        for change in changes {
            let (from, to) = (t(change) - Duration::days(3), t(change) + Duration::days(3));
            for p in &PATTERNS {
                let c = cron(p.cron, Some(zone_name));
                let expected = reference(p, zone, from, to);
                let got = times(&c, from - Duration::seconds(1), to - Duration::seconds(1));
                assert_eq!(got, expected, "{} in {zone_name} around {change}", p.cron);
                if p.fixed && p.cron != "0 2 * * 0" {
                    // Exactly one run on each local day, none skipped.
                    let days: Vec<NaiveDate> = got.iter().map(|at| at.with_timezone(&zone).date_naive()).collect();
                    assert!(days.len() >= 5, "{} in {zone_name}: {got:?}", p.cron);
                    for pair in days.windows(2) {
                        assert_eq!(pair[1], pair[0] + Duration::days(1), "{} in {zone_name}: {got:?}", p.cron);
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// From any instant near a change, `next_after` and `latest_due` give
    /// the reference's answers and agree with each other.
    #[test]
    fn next_after_and_latest_due_agree_near_changes(
        zone_index in 0..ZONES.len(),
        change_index in 0..2usize,
        pattern_index in 0..PATTERNS.len(),
        start in -2 * 86_400i64..2 * 86_400,
        span in 1i64..2 * 86_400,
    ) {
        let (zone_name, changes) = ZONES[zone_index];
        let zone: Tz = zone_name.parse().unwrap();
        let p = &PATTERNS[pattern_index];
        let c = cron(p.cron, Some(zone_name));
        let a = t(changes[change_index]) + Duration::seconds(start);
        let b = a + Duration::seconds(span);
        // Wide enough to hold the next time of the weekly pattern.
        let window = reference(p, zone, a - Duration::days(1), b + Duration::days(8));

        let next = c.next_after(a).unwrap();
        prop_assert_eq!(Some(next), window.iter().copied().find(|at| *at > a), "next_after({})", a);
        prop_assert_eq!(c.latest_due(a, next), Some(next), "latest_due(a, next_after(a))");
        prop_assert_eq!(c.latest_due(a, next - Duration::seconds(1)), None, "nothing between a and next_after(a)");
        let latest = window.iter().copied().filter(|at| *at > a && *at <= b).max();
        prop_assert_eq!(c.latest_due(a, b), latest, "latest_due({}, {})", a, b);
        if let Some(latest) = latest {
            prop_assert!(c.next_after(latest).is_none_or(|n| n > b), "latest_due missed a later time before {}", b);
        }
    }
}
