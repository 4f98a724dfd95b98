//! The operator's Events on the real API server: the same event again
//! counts into the first Event's series; a different one is its own Event.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use segment_operator::events::{EventNote, EventPublisher};

use crate::cluster;

#[test]
fn the_same_event_again_counts_into_one_series() {
    let cluster = cluster();
    let namespace = cluster.namespace("events");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = cluster.client().await;
        let publisher = EventPublisher::new(client.clone(), "segment-operator", "replica-a");
        let vip = ObjectReference {
            api_version: Some("segmentation.dev/v1alpha1".into()),
            kind: Some("Segment".into()),
            namespace: Some(namespace.clone()),
            name: Some("vip".into()),
            uid: Some("0b7a3a52-0000-4000-8000-000000000001".into()),
            ..Default::default()
        };
        let failed =
            EventNote { warning: true, reason: "RunFailed".into(), action: "RunFailed-1a2b".into(), note: "v2 failed".into() };
        let deleted = EventNote {
            warning: false,
            reason: "VersionDeleted".into(),
            action: "VersionDeleted-3c4d".into(),
            note: "v1 deleted".into(),
        };
        for _ in 0..3 {
            publisher.publish(&failed, &vip).await.expect("published");
        }
        publisher.publish(&deleted, &vip).await.expect("published");

        let events: Api<Event> = Api::namespaced(client, &namespace);
        let mut listed = events.list(&ListParams::default()).await.expect("events").items;
        listed.sort_by_key(|e| e.reason.clone());
        let summary: Vec<_> = listed
            .iter()
            .map(|e| {
                (
                    e.reason.clone().unwrap_or_default(),
                    e.type_.clone().unwrap_or_default(),
                    e.note.clone().unwrap_or_default(),
                    e.series.as_ref().map(|s| s.count),
                    e.regarding.as_ref().and_then(|r| r.name.clone()),
                    e.reporting_instance.clone(),
                )
            })
            .collect();
        let instance = Some("replica-a".to_string());
        assert_eq!(
            summary,
            [
                ("RunFailed".into(), "Warning".into(), "v2 failed".into(), Some(3), Some("vip".into()), instance.clone()),
                ("VersionDeleted".into(), "Normal".into(), "v1 deleted".into(), None, Some("vip".into()), instance),
            ]
        );
    });
}
