//! The membership topic's messages (docs/realtime.md): key = user id,
//! value `{"segment":"ns/name","user":"u1","op":"include"|"exclude",
//! "ts":"RFC3339","id":"..."}`. Parsing is strict and names the field that
//! is wrong, because a rejected message lands in the dead-letter topic with
//! that reason for a person to read.

use chrono::{DateTime, Utc};
use segment_core::api::SegmentKey;
use segment_core::store::{Override, OverrideOp, MAX_USER_LEN};
use serde_json::{Map, Value};

/// A valid include or exclude of one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipEvent {
    pub segment: SegmentKey,
    pub change: Override,
}

/// Why a message went to the dead-letter topic. The label is a metric label
/// and a header, so it is one of a few fixed words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Not JSON, or not a JSON object.
    MalformedJson,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong type or value.
    InvalidField,
    /// The key is absent or not the user id, which would break per-user ordering.
    KeyMismatch,
    /// The segment has no active version in the store.
    UnknownSegment,
    /// `ts` is further ahead of the worker's clock than the allowed skew:
    /// recorded, it would win against every real event of the user until then.
    FutureTimestamp,
    /// The store refused the write with an error that retrying does not
    /// fix, on every attempt ([`super::PERMANENT_ATTEMPTS`]).
    StoreError,
}

impl RejectReason {
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::MalformedJson => "malformed_json",
            RejectReason::MissingField => "missing_field",
            RejectReason::InvalidField => "invalid_field",
            RejectReason::KeyMismatch => "key_mismatch",
            RejectReason::UnknownSegment => "unknown_segment",
            RejectReason::FutureTimestamp => "future_timestamp",
            RejectReason::StoreError => "store_error",
        }
    }
}

/// A rejected message: the reason and a sentence naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, message: impl Into<String>) -> Rejection {
        Rejection { reason, message: message.into() }
    }
}

/// Parses one message. `key` is the Kafka message key.
pub fn parse(key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<MembershipEvent, Rejection> {
    let payload = payload.ok_or_else(|| Rejection::new(RejectReason::MalformedJson, "value: empty message"))?;
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| Rejection::new(RejectReason::MalformedJson, format!("value: not JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(Rejection::new(RejectReason::MalformedJson, "value: expected a JSON object"));
    };
    let segment = parse_segment(text(&fields, "segment")?)?;
    let user = id(&fields, "user")?;
    let op = match text(&fields, "op")? {
        "include" => OverrideOp::Include,
        "exclude" => OverrideOp::Exclude,
        other => return Err(invalid(format!("op: {other:?} is neither \"include\" nor \"exclude\""))),
    };
    let ts = text(&fields, "ts")?;
    let ts = DateTime::parse_from_rfc3339(ts)
        .map_err(|e| invalid(format!("ts: {ts:?} is not an RFC 3339 time: {e}")))?
        .with_timezone(&Utc);
    let id = id(&fields, "id")?;
    match key {
        Some(key) if key == user.as_bytes() => {}
        Some(key) => {
            return Err(Rejection::new(
                RejectReason::KeyMismatch,
                format!(
                    "key: {:?} is not the user {user:?}; one user's events must share a key to stay in order",
                    String::from_utf8_lossy(key)
                ),
            ))
        }
        None => {
            return Err(Rejection::new(
                RejectReason::KeyMismatch,
                "key: missing; the key must be the user id so one user's events stay in order",
            ))
        }
    }
    // The offset is the consumer's to add: it is not part of the message.
    Ok(MembershipEvent { segment, change: Override { user, op, ts, id, offset: None } })
}

fn invalid(message: String) -> Rejection {
    Rejection::new(RejectReason::InvalidField, message)
}

fn text<'a>(fields: &'a Map<String, Value>, name: &str) -> Result<&'a str, Rejection> {
    match fields.get(name) {
        None | Some(Value::Null) => Err(Rejection::new(RejectReason::MissingField, format!("{name}: missing"))),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(invalid(format!("{name}: expected a string, found {other}"))),
    }
}

fn id(fields: &Map<String, Value>, name: &str) -> Result<String, Rejection> {
    let value = text(fields, name)?;
    if value.is_empty() {
        return Err(invalid(format!("{name}: empty")));
    }
    if value.len() > MAX_USER_LEN {
        return Err(invalid(format!("{name}: {} bytes, more than {MAX_USER_LEN}", value.len())));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(format!("{name}: contains control characters")));
    }
    Ok(value.to_string())
}

/// `namespace/name`, each a Kubernetes name (lowercase letters, digits, `-`
/// and `.`), as a Segment's namespace and name are.
fn parse_segment(value: &str) -> Result<SegmentKey, Rejection> {
    let Some((namespace, name)) = value.split_once('/') else {
        return Err(invalid(format!("segment: {value:?} is not \"namespace/name\"")));
    };
    for (part, what, max) in [(namespace, "namespace", 63), (name, "name", 253)] {
        let well_formed = !part.is_empty()
            && part.len() <= max
            && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && part.starts_with(|c: char| c.is_ascii_alphanumeric())
            && part.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !well_formed {
            return Err(invalid(format!("segment: {what} {part:?} is not a Kubernetes name")));
        }
    }
    Ok(SegmentKey::new(namespace, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(overrides: &[(&str, Value)]) -> Vec<u8> {
        let mut value = serde_json::json!({
            "segment": "growth/vip", "user": "u1", "op": "include",
            "ts": "2026-11-01T10:00:00+01:00", "id": "evt-1"
        });
        for (field, v) in overrides {
            if v.is_null() {
                value.as_object_mut().unwrap().remove(*field);
            } else {
                value[*field] = v.clone();
            }
        }
        serde_json::to_vec(&value).unwrap()
    }

    fn rejected(key: Option<&[u8]>, payload: &[u8]) -> Rejection {
        parse(key, Some(payload)).expect_err("rejected")
    }

    #[test]
    fn a_valid_message_becomes_an_override() {
        let event = parse(Some(b"u1"), Some(&message(&[]))).unwrap();
        assert_eq!(event.segment, SegmentKey::new("growth", "vip"));
        assert_eq!(event.change.user, "u1");
        assert_eq!(event.change.op, OverrideOp::Include);
        assert_eq!(event.change.id, "evt-1");
        assert_eq!(event.change.ts.to_rfc3339(), "2026-11-01T09:00:00+00:00", "times are kept in UTC");
        let exclude = parse(Some(b"u1"), Some(&message(&[("op", "exclude".into())]))).unwrap();
        assert_eq!(exclude.change.op, OverrideOp::Exclude);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(Vec<u8>, RejectReason, &str)> = vec![
            (b"{not json".to_vec(), RejectReason::MalformedJson, "value: not JSON"),
            (b"[1,2]".to_vec(), RejectReason::MalformedJson, "value: expected a JSON object"),
            (message(&[("segment", Value::Null)]), RejectReason::MissingField, "segment: missing"),
            (message(&[("user", Value::Null)]), RejectReason::MissingField, "user: missing"),
            (message(&[("ts", Value::Null)]), RejectReason::MissingField, "ts: missing"),
            (message(&[("id", Value::Null)]), RejectReason::MissingField, "id: missing"),
            (message(&[("op", "add".into())]), RejectReason::InvalidField, "op: \"add\""),
            (message(&[("op", 1.into())]), RejectReason::InvalidField, "op: expected a string"),
            (message(&[("ts", "yesterday".into())]), RejectReason::InvalidField, "ts: \"yesterday\""),
            (message(&[("segment", "vip".into())]), RejectReason::InvalidField, "segment: \"vip\""),
            (message(&[("segment", "Growth/vip".into())]), RejectReason::InvalidField, "segment: namespace \"Growth\""),
            (message(&[("segment", "growth/".into())]), RejectReason::InvalidField, "segment: name \"\""),
            (message(&[("user", "".into())]), RejectReason::InvalidField, "user: empty"),
            (message(&[("user", "x".repeat(300).into())]), RejectReason::InvalidField, "user: 300 bytes"),
            (message(&[("id", "a\nb".into())]), RejectReason::InvalidField, "id: contains control"),
        ];
        for (payload, reason, start) in cases {
            let key: &[u8] = b"u1";
            let rejection = rejected(Some(key), &payload);
            assert_eq!(rejection.reason, reason, "{}", String::from_utf8_lossy(&payload));
            assert!(rejection.message.starts_with(start), "{:?} should start with {start:?}", rejection.message);
        }
        assert_eq!(parse(Some(b"u1"), None).unwrap_err().reason, RejectReason::MalformedJson);
    }

    #[test]
    fn the_key_must_be_the_user() {
        let other = rejected(Some(b"u2"), &message(&[]));
        assert_eq!(other.reason, RejectReason::KeyMismatch);
        assert!(other.message.contains("\"u2\" is not the user \"u1\""), "{}", other.message);
        assert_eq!(rejected(None, &message(&[])).reason, RejectReason::KeyMismatch);
    }
}
