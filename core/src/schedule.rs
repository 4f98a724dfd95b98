//! Cron schedules read in an IANA time zone, with CronJob's rules for
//! missed runs: only the latest missed time is run, and not at all once it
//! is more than `startingDeadlineSeconds` late.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

use crate::api::Schedule;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ScheduleError {
    pub field: &'static str,
    pub message: String,
}

/// A parsed `spec.schedule`.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: Cron,
    zone: Tz,
}

impl CronSchedule {
    /// Parses a five-field cron or an `@` macro (`@hourly`, `@daily`,
    /// `@weekly`, `@monthly`, `@yearly`) and the time zone (UTC by default).
    pub fn parse(schedule: &Schedule) -> Result<Self, ScheduleError> {
        Self::from_parts(&schedule.cron, schedule.time_zone.as_deref())
    }

    pub fn from_parts(cron: &str, time_zone: Option<&str>) -> Result<Self, ScheduleError> {
        let text = cron.trim();
        let fields = text.split_whitespace().count();
        if !text.starts_with('@') && fields != 5 {
            return Err(ScheduleError {
                field: "spec.schedule.cron",
                message: format!("`{text}` has {fields} fields; write five (minute hour day-of-month month day-of-week) or a macro like @hourly"),
            });
        }
        if text.eq_ignore_ascii_case("@reboot") {
            return Err(ScheduleError { field: "spec.schedule.cron", message: "@reboot has no meaning for a segment".into() });
        }
        let parser = CronParser::builder().seconds(Seconds::Disallowed).year(Year::Disallowed).build();
        let cron = parser
            .parse(text)
            .map_err(|e| ScheduleError { field: "spec.schedule.cron", message: format!("`{text}` is not a valid cron: {e}") })?;
        let zone = match time_zone {
            None | Some("") => Tz::UTC,
            Some(name) => Tz::from_str(name).map_err(|_| ScheduleError {
                field: "spec.schedule.timeZone",
                message: format!("`{name}` is not an IANA time zone (for example Europe/Madrid)"),
            })?,
        };
        let schedule = CronSchedule { cron, zone };
        // `0 0 30 2 *` parses but never fires: say so instead of waiting forever.
        let reference = DateTime::<Utc>::from_timestamp(946_684_800, 0).unwrap_or_default();
        if schedule.next_after(reference).is_none() {
            return Err(ScheduleError { field: "spec.schedule.cron", message: format!("`{text}` never fires (no such date)") });
        }
        Ok(schedule)
    }

    /// The first scheduled time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&t.with_timezone(&self.zone), false).ok().map(|d| d.with_timezone(&Utc))
    }

    /// The latest scheduled time in `(after, until]`: the one run CronJob
    /// semantics start after any number of missed times.
    pub fn latest_due(&self, after: DateTime<Utc>, until: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if until <= after {
            return None;
        }
        let latest = self.cron.find_previous_occurrence(&until.with_timezone(&self.zone), true).ok()?.with_timezone(&Utc);
        (latest > after).then_some(latest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cron_that_never_fires_is_rejected() {
        let err = CronSchedule::from_parts("0 0 30 2 *", None).unwrap_err();
        assert!(err.message.contains("never fires"), "{err}");
        assert!(CronSchedule::from_parts("0 0 29 2 *", None).is_ok(), "29 February exists in leap years");
    }
}
