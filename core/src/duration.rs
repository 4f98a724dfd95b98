//! Durations written as `<number><unit>` (`45s`, `30m`, `12h`, `7d`, `2w`),
//! as used by `within` windows and `keepResultsFor`.

use chrono::Duration;

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let unit_at = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(unit_at);
    let n: i64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: write a whole number and a unit (s, m, h, d, w), e.g. 90d"))?;
    let seconds_per_unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(format!("`{text}` has unit `{unit}`; use s, m, h, d or w")),
    };
    n.checked_mul(seconds_per_unit).and_then(Duration::try_seconds).ok_or_else(|| format!("`{text}` is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("45s").unwrap(), Duration::seconds(45));
        assert_eq!(parse_duration("30m").unwrap(), Duration::minutes(30));
        assert_eq!(parse_duration("12h").unwrap(), Duration::hours(12));
        assert_eq!(parse_duration("90d").unwrap(), Duration::days(90));
        assert_eq!(parse_duration("2w").unwrap(), Duration::weeks(2));
    }

    #[test]
    fn rejects_bad_text_with_a_reason() {
        assert!(parse_duration("7").unwrap_err().contains("unit"));
        assert!(parse_duration("d").unwrap_err().contains("whole number"));
        assert!(parse_duration("1.5d").unwrap_err().contains("unit"));
        assert!(parse_duration("99999999999999999w").is_err());
    }
}
