//! Kubernetes times (jiff) to the chrono times the lifecycle uses.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;

pub fn to_chrono(t: &Time) -> DateTime<Utc> {
    timestamp_to_chrono(&t.0)
}

pub fn micro_to_chrono(t: &MicroTime) -> DateTime<Utc> {
    timestamp_to_chrono(&t.0)
}

pub fn to_micro(t: DateTime<Utc>) -> MicroTime {
    MicroTime(Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn timestamp_to_chrono(t: &Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond().max(0) as u32).unwrap_or_default()
}
