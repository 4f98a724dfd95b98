//! The key layout (docs/storage.md). Every key of one segment carries the
//! hash tag `{ns/name}`, so in a cluster they share one slot: the Lua
//! scripts that compare-and-set across them are atomic, and a segment's
//! pipelines go to one node. Every key is small: no key holds members.

use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use segment_core::api::SegmentKey;
use segment_core::store::StoreError;

/// Hash `ns/name` → active version, plus [`EPOCH_FIELD`].
pub(crate) const ALIASES: &str = "sg:aliases";
/// Field of [`ALIASES`] holding the store's epoch: set by the first
/// activation, so it vanishes only with the whole state (a flush, an empty
/// replacement). Not a segment: it has no `/`.
pub(crate) const EPOCH_FIELD: &str = "!epoch";
/// The notice channel (`segment_core::store::Notice`, in its wire form
/// `Notice::payload`): `ns/name <version>` on a rollover, `ns/name -` when
/// the segment no longer has an active version, `load ns/name <version>`
/// on a load request, `override ns/name <JSON>` for an override that took
/// effect. The name predates the other kinds; subscribers know it.
pub const ROLLOVER_CHANNEL: &str = "sg:rollover";
/// Hash replica → until when it is live (Unix ms), as the replica last
/// renewed it (`ReplicaRegistry::replica_alive`). Global, like the
/// aliases: one small field per serving replica.
pub(crate) const REPLICAS: &str = "sg:replicas";
/// Hash `ns/name` → the version serving replicas are asked to load ahead
/// of the segment's rollover (`ReplicaRegistry::request_load`). Global, so
/// that one read lists them all; one field per segment in rollover.
pub(crate) const LOAD_REQUESTS: &str = "sg:load";
/// Width of [`order_key`]; the Lua scripts slice stored overrides by it.
pub(crate) const ORDER_KEY_WIDTH: usize = 30;

/// The keys of one segment.
pub(crate) struct SegmentKeys {
    /// `ns/name`: the field of the segment in the global hashes.
    pub field: String,
    /// `sg:{ns/name}:`
    base: String,
}

impl SegmentKeys {
    pub fn new(segment: &SegmentKey) -> SegmentKeys {
        let field = segment.to_string();
        let base = format!("sg:{{{field}}}:");
        SegmentKeys { field, base }
    }

    /// Hash version → JSON metadata of every sealed version.
    pub fn meta(&self) -> String {
        format!("{}meta", self.base)
    }

    /// Set of the versions being deleted (fenced and unlisted, not yet
    /// done), listed unsealed until their delete ends, so that an
    /// interrupted delete is finished by the next one. Keys written by the
    /// former per-membership layout listed every loaded version here too.
    pub fn loaded(&self) -> String {
        format!("{}loaded", self.base)
    }

    /// Set of the versions readers were ever switched to.
    pub fn promoted(&self) -> String {
        format!("{}promoted", self.base)
    }

    /// Set of deleted versions, which sealing refuses.
    pub fn fenced(&self) -> String {
        format!("{}fenced", self.base)
    }

    /// Hash user → newest override.
    pub fn overrides(&self) -> String {
        format!("{}ov", self.base)
    }

    /// Hash of change-event bookkeeping: `version` (published last),
    /// `claim` (`<version> <expiry ms> <holder>` of the worker publishing),
    /// `incarnation` (set by the first claim) and `announced` (how many
    /// announcements finished): `segment_core::store::Transition`.
    pub fn changes(&self) -> String {
        format!("{}changes", self.base)
    }

    /// Hash replica → the versions of the segment it holds in memory, as it
    /// last reported them (`3,4`). Kept with the segment (and deleted with
    /// it), since only the segment's rollover reads it; an entry of a
    /// replica that is no longer live is ignored, not removed.
    pub fn replicas(&self) -> String {
        format!("{}replicas", self.base)
    }
}

/// `SCAN` patterns that find the keys of the former per-membership layout
/// (a set of members per version, a hash of versions per user); each key
/// found is checked with [`is_former_layout`] before it is removed.
pub(crate) const FORMER_LAYOUT_PATTERNS: [&str; 2] = ["sg:u:*", "sg:{*}:v*"];

/// Whether `key` is one the former per-membership layout wrote:
/// `sg:u:<user>` or `sg:{ns/name}:v<digits>`. No key of today's layout is:
/// its global keys are not under `sg:u:`, and a segment's keys end in a
/// word (`meta`, `loaded`, ...), never `v` and digits.
pub(crate) fn is_former_layout(key: &str) -> bool {
    if key.strip_prefix("sg:u:").is_some_and(|user| !user.is_empty()) {
        return true;
    }
    let Some(rest) = key.strip_prefix("sg:{") else { return false };
    let Some((segment, suffix)) = rest.rsplit_once("}:v") else { return false };
    parse_segment(segment).is_some()
        && !segment.contains(['{', '}'])
        && !suffix.is_empty()
        && suffix.bytes().all(|b| b.is_ascii_digit())
}

pub(crate) fn parse_segment(field: &str) -> Option<SegmentKey> {
    let (namespace, name) = field.split_once('/')?;
    Some(SegmentKey::new(namespace, name))
}

/// Rejects segment keys the layout cannot round-trip: `/` separates the
/// namespace from the name, braces would move the hash tag, and `#` is
/// kept out as the former layout's separator of a segment and a version
/// (Kubernetes names never contain any of them).
pub(crate) fn check_segment(segment: &SegmentKey) -> Result<(), StoreError> {
    let bad = |part: &str, what: &str, forbidden: &[char]| {
        if part.is_empty() {
            return Some(format!("{what} is empty"));
        }
        part.chars().find(|c| forbidden.contains(c)).map(|c| format!("{what} {part:?} contains {c:?}"))
    };
    let reason =
        bad(&segment.namespace, "namespace", &['{', '}', '#', '/']).or_else(|| bad(&segment.name, "name", &['{', '}', '#']));
    match reason {
        Some(reason) => Err(StoreError::Other(format!("invalid segment key {segment}: {reason}").into())),
        None => Ok(()),
    }
}

/// A fixed-width UTC timestamp whose byte order is time order, so the Lua
/// scripts compare override times and snapshot times as strings. Years
/// outside 0..=9999 are clamped (RFC 3339 cannot carry them anyway).
pub(crate) fn order_key(ts: &DateTime<Utc>) -> String {
    match ts.year() {
        y if y < 0 => "0000-01-01T00:00:00.000000000Z".to_string(),
        y if y > 9999 => "9999-12-31T23:59:59.999999999Z".to_string(),
        _ => ts.to_rfc3339_opts(SecondsFormat::Nanos, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// The former layout's keys are told from today's, whatever the
    /// segment is called.
    #[test]
    fn former_layout_keys_are_told_from_todays() {
        for former in ["sg:u:user-1", "sg:u:{odd}", "sg:{growth/lapsed}:v12", "sg:{ns/v1}:v3"] {
            assert!(is_former_layout(former), "{former}");
        }
        let v1 = SegmentKeys::new(&SegmentKey::new("ns", "v1"));
        let today = [
            ALIASES.to_string(),
            REPLICAS.to_string(),
            LOAD_REQUESTS.to_string(),
            ROLLOVER_CHANNEL.to_string(),
            v1.meta(),
            v1.loaded(),
            v1.promoted(),
            v1.fenced(),
            v1.overrides(),
            v1.changes(),
            v1.replicas(),
        ];
        for key in today.iter().map(String::as_str).chain(["sg:u:", "sg:{ns/name}:v", "sg:{ns/name}:v1x", "sg:{nons}:v1"]) {
            assert!(!is_former_layout(key), "{key}");
        }
    }

    #[test]
    fn fields_round_trip() {
        let segment = SegmentKey::new("growth", "lapsed-high-value");
        let keys = SegmentKeys::new(&segment);
        assert_eq!(keys.meta(), "sg:{growth/lapsed-high-value}:meta");
        assert_eq!(keys.replicas(), "sg:{growth/lapsed-high-value}:replicas");
        assert_eq!(parse_segment(&keys.field), Some(segment));
    }

    #[test]
    fn order_keys_sort_like_times() {
        let a = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap();
        let b = a + chrono::Duration::nanoseconds(1);
        let c = Utc.with_ymd_and_hms(2031, 12, 9, 23, 0, 0).unwrap();
        let keys: Vec<String> = [a, b, c].iter().map(order_key).collect();
        assert!(keys.iter().all(|k| k.len() == ORDER_KEY_WIDTH), "{keys:?}");
        assert!(keys[0] < keys[1] && keys[1] < keys[2]);
    }

    #[test]
    fn odd_segment_keys_are_refused() {
        assert!(check_segment(&SegmentKey::new("ns", "ok-name")).is_ok());
        for (ns, name) in [("", "a"), ("a", ""), ("a/b", "c"), ("a", "b#1"), ("a", "{b}")] {
            assert!(check_segment(&SegmentKey::new(ns, name)).is_err(), "{ns}/{name}");
        }
    }
}
