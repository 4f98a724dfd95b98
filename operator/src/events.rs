//! The operator's Kubernetes Events (`events.k8s.io/v1`).
//!
//! The same event for the same object again within [`SERIES_WINDOW`]
//! counts up the first Event's `series` instead of creating another
//! Event, as client-go's recorder does, so a Segment that keeps failing
//! the same way shows one Event with a count, not one per reconcile.
//!
//! kube-runtime's `Recorder` does the same but keeps a full copy of every
//! Event it published for six minutes and scans them all on every publish:
//! with 10,000 Segments starting runs at once that was tens of megabytes
//! and a scan per Event (docs/benchmarks.md, "The operator on the local
//! control plane"). This publisher remembers only each Event's name and
//! count, and forgets old entries at most once per window.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as KubeEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;

/// How long an Event stays the one later occurrences count into.
pub const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// One Event to publish about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventNote {
    pub warning: bool,
    /// `reason` of the Event: a short CamelCase word.
    pub reason: String,
    /// `action` of the Event; with the reason and the object it decides
    /// which occurrences are the same event.
    pub action: String,
    /// What happened, for people.
    pub note: String,
}

/// Publishes Events as one reporting controller and instance.
pub struct EventPublisher {
    client: Client,
    controller: String,
    instance: String,
    recent: Mutex<Recent>,
}

/// Events published within the window, by [`series_key`].
#[derive(Default)]
struct Recent {
    by_key: HashMap<String, Published>,
    swept_at: Option<Timestamp>,
}

#[derive(Clone)]
struct Published {
    name: String,
    count: i32,
    last_seen: Timestamp,
}

impl Recent {
    /// Forgets Events last seen before the window, at most once per window
    /// so that publishing stays O(1) however many Events are remembered.
    fn sweep(&mut self, now: Timestamp) {
        if self.swept_at.is_some_and(|at| now.duration_since(at) < SERIES_WINDOW) {
            return;
        }
        self.by_key.retain(|_, published| now.duration_since(published.last_seen) < SERIES_WINDOW);
        self.swept_at = Some(now);
    }

    /// The Event this occurrence counts into, if one is recent enough.
    fn current(&self, key: &str, now: Timestamp) -> Option<Published> {
        self.by_key.get(key).filter(|p| now.duration_since(p.last_seen) < SERIES_WINDOW).cloned()
    }
}

/// Which occurrences count into one Event: the object (by uid, so a
/// re-created Segment starts afresh), the type, reason and action.
fn series_key(regarding: &ObjectReference, event: &EventNote) -> String {
    format!(
        "{}/{}/{}/{}/{}/{}/{}",
        regarding.namespace.as_deref().unwrap_or_default(),
        regarding.kind.as_deref().unwrap_or_default(),
        regarding.name.as_deref().unwrap_or_default(),
        regarding.uid.as_deref().unwrap_or_default(),
        if event.warning { "Warning" } else { "Normal" },
        event.reason,
        event.action,
    )
}

impl EventPublisher {
    pub fn new(client: Client, controller: &str, instance: &str) -> EventPublisher {
        EventPublisher { client, controller: controller.to_string(), instance: instance.to_string(), recent: Default::default() }
    }

    /// Creates the Event, or counts it into the recent one that matches.
    /// No lock is held across the API call; two reconciles of the same
    /// object do not run at once, so they do not race on one series.
    pub async fn publish(&self, event: &EventNote, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".to_string());
        let events: Api<KubeEvent> = Api::namespaced(self.client.clone(), &namespace);
        let key = series_key(regarding, event);
        let now = Timestamp::now();
        let earlier = {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            recent.sweep(now);
            recent.current(&key, now)
        };
        let published = match earlier {
            Some(earlier) => {
                let count = earlier.count + 1;
                let series = EventSeries { count, last_observed_time: MicroTime(now) };
                events.patch(&earlier.name, &PatchParams::default(), &Patch::Merge(json!({ "series": series }))).await?;
                Published { name: earlier.name, count, last_seen: now }
            }
            None => {
                let new_event = self.new_event(event, regarding, now);
                events.create(&PostParams::default(), &new_event).await?;
                Published { name: new_event.metadata.name.unwrap_or_default(), count: 1, last_seen: now }
            }
        };
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).by_key.insert(key, published);
        Ok(())
    }

    fn new_event(&self, event: &EventNote, regarding: &ObjectReference, now: Timestamp) -> KubeEvent {
        let object_name = regarding.name.as_deref().unwrap_or(&self.controller);
        KubeEvent {
            metadata: ObjectMeta {
                // As client-go names them: the object and the time.
                name: Some(format!("{object_name}.{:x}", now.as_nanosecond())),
                namespace: regarding.namespace.clone(),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(if event.warning { "Warning" } else { "Normal" }.to_string()),
            reason: Some(event.reason.clone()),
            action: Some(event.action.clone()),
            note: Some(event.note.clone()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(name: &str, last_seen: Timestamp) -> Published {
        Published { name: name.to_string(), count: 1, last_seen }
    }

    #[test]
    fn an_event_counts_into_a_series_only_within_the_window() {
        let start = Timestamp::from_second(1_800_000_000).unwrap();
        let mut recent = Recent::default();
        recent.by_key.insert("k".into(), published("vip.1", start));
        assert_eq!(recent.current("k", start + SignedDuration::from_mins(5)).map(|p| p.name), Some("vip.1".into()));
        assert!(recent.current("k", start + SERIES_WINDOW).is_none());
        assert!(recent.current("other", start).is_none());
    }

    #[test]
    fn old_events_are_forgotten_at_most_once_per_window() {
        let start = Timestamp::from_second(1_800_000_000).unwrap();
        let mut recent = Recent::default();
        recent.by_key.insert("old".into(), published("a.1", start));
        recent.sweep(start + SignedDuration::from_mins(1));
        assert_eq!(recent.by_key.len(), 1, "still within the window");
        recent.by_key.insert("new".into(), published("b.1", start + SignedDuration::from_mins(2)));
        // The next sweep waits a window after the last one.
        recent.sweep(start + SignedDuration::from_mins(6) + SignedDuration::from_secs(30));
        assert_eq!(recent.by_key.len(), 2);
        recent.sweep(start + SignedDuration::from_mins(7) + SignedDuration::from_secs(1));
        assert_eq!(recent.by_key.keys().collect::<Vec<_>>(), ["new"]);
    }

    #[test]
    fn the_object_type_reason_and_action_make_the_series() {
        let vip = ObjectReference {
            namespace: Some("growth".into()),
            kind: Some("Segment".into()),
            name: Some("vip".into()),
            uid: Some("u1".into()),
            ..Default::default()
        };
        let failed = EventNote { warning: true, reason: "RunFailed".into(), action: "RunFailed-ab".into(), note: "x".into() };
        let key = series_key(&vip, &failed);
        assert_eq!(key, series_key(&vip, &EventNote { note: "another note".into(), ..failed.clone() }));
        assert_ne!(key, series_key(&vip, &EventNote { action: "RunFailed-cd".into(), ..failed.clone() }));
        assert_ne!(key, series_key(&vip, &EventNote { warning: false, ..failed.clone() }));
        assert_ne!(key, series_key(&ObjectReference { uid: Some("u2".into()), ..vip.clone() }, &failed));
        assert_ne!(key, series_key(&ObjectReference { namespace: Some("other".into()), ..vip }, &failed));
    }
}
