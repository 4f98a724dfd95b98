//! The operator's retention of result files (`ObjectResults`) on local
//! files and on a real S3 server: one store for every Segment under a base
//! URI, each Segment's files found under `<base>/<namespace>/<name>/`.

use chrono::{DateTime, Duration, TimeZone, Utc};
use segment_core::api::SegmentKey;
use segment_core::naming::results_uri;
use segment_core::store::ResultStore;
use segment_store::results::ObjectResults;

fn computed(version: u64) -> DateTime<Utc> {
    // write_result records computedAt two minutes after the snapshot.
    Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap() + Duration::days(version as i64) - Duration::minutes(2)
}

async fn write_versions(base: &str, segment: &SegmentKey, versions: &[u64]) {
    for &version in versions {
        let parts = vec![vec![format!("user-{version}")]];
        segment_tests::write_result(&results_uri(base, segment, version), segment, version, computed(version), &parts).await;
    }
}

async fn versions(results: &ObjectResults, segment: &SegmentKey) -> Vec<u64> {
    results.versions(segment).await.expect("a listing").into_iter().map(|(v, _)| v).collect()
}

/// Retention under `base`: expired versions go except those kept, other
/// Segments (same name in another namespace, a name that extends this
/// one) are left alone, and deleting a Segment removes only its files.
async fn retention_keeps_each_segment_apart(base: &str) {
    let vip = SegmentKey::new("growth", "vip");
    let vip_elsewhere = SegmentKey::new("finance", "vip");
    let vip2 = SegmentKey::new("growth", "vip2");
    write_versions(base, &vip, &[1, 2, 3, 4]).await;
    write_versions(base, &vip_elsewhere, &[1]).await;
    write_versions(base, &vip2, &[1]).await;
    // One ObjectResults for all of them, as the operator holds.
    let results = ObjectResults::new(base);
    assert_eq!(versions(&results, &vip).await, [1, 2, 3, 4]);

    // Computed before v4's day: v1..v3 expired; v2 is kept (a rollback).
    let older_than = computed(4) - Duration::hours(1);
    assert_eq!(results.collect(&vip, older_than, &[2]).await.expect("collected"), 2);
    assert_eq!(versions(&results, &vip).await, [2, 4]);
    assert_eq!(versions(&results, &vip_elsewhere).await, [1]);
    assert_eq!(versions(&results, &vip2).await, [1]);

    results.delete_segment(&vip).await.expect("deleted");
    assert_eq!(versions(&results, &vip).await, Vec::<u64>::new());
    assert_eq!(versions(&results, &vip_elsewhere).await, [1]);
    assert_eq!(versions(&results, &vip2).await, [1]);
}

#[tokio::test]
async fn retention_on_local_files_with_and_without_a_prefix() {
    let dir = tempfile::tempdir().unwrap();
    retention_keeps_each_segment_apart(&format!("file://{}", dir.path().display())).await;
    retention_keeps_each_segment_apart(&format!("file://{}/prefix/deeper/", dir.path().display())).await;
}

#[tokio::test]
async fn retention_on_s3_with_and_without_a_prefix() {
    let s3 = segment_tests::shared_s3();
    s3.create_bucket("retention-results");
    retention_keeps_each_segment_apart("s3://retention-results").await;
    retention_keeps_each_segment_apart("s3://retention-results/prefix/deeper/").await;
}
