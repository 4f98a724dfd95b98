//! Leader election against the fake API server: the Lease is created,
//! renewed, respected while another replica holds it, and taken over once
//! it expires, with optimistic concurrency on every write.

use crate::fake_api;

use std::sync::{Arc, Mutex};

use chrono::{Duration, TimeZone, Utc};
use fake_api::World;
use segment_operator::leader::LeaseLock;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";

fn world() -> fake_api::SharedWorld {
    Arc::new(Mutex::new(World::default()))
}

fn lock(world: &fake_api::SharedWorld, identity: &str) -> LeaseLock {
    LeaseLock::new(fake_api::client(world.clone()), "ops", "segment-operator", identity, 15)
}

fn writes(world: &fake_api::SharedWorld) -> Vec<String> {
    world.lock().unwrap().log.iter().filter(|l| l.method != "GET").map(|l| l.line()).collect()
}

#[tokio::test]
async fn the_first_replica_creates_the_lease_and_renews_it() {
    let w = world();
    let t = Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap();
    let a = lock(&w, "pod-a");
    assert!(a.try_acquire_or_renew(t).await.unwrap());
    assert_eq!(writes(&w), vec![format!("POST {LEASES}")]);
    assert!(a.try_acquire_or_renew(t + Duration::seconds(5)).await.unwrap());
    assert_eq!(writes(&w)[1], format!("PUT {LEASES}/segment-operator"));
    let lease = w.lock().unwrap().leases["segment-operator"].clone().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("pod-a"));
    assert_eq!(lease.lease_transitions, Some(0));
    assert_eq!(lease.acquire_time.unwrap().0.as_second(), t.timestamp(), "renewal keeps the acquire time");
    assert_eq!(lease.renew_time.unwrap().0.as_second(), (t + Duration::seconds(5)).timestamp());
}

#[tokio::test]
async fn a_live_lease_of_another_replica_is_left_alone_and_an_expired_one_is_taken() {
    let w = world();
    let t = Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap();
    assert!(lock(&w, "pod-a").try_acquire_or_renew(t).await.unwrap());
    let b = lock(&w, "pod-b");
    assert!(!b.try_acquire_or_renew(t + Duration::seconds(10)).await.unwrap(), "pod-a renewed 10s ago; its lease lasts 15s");
    assert_eq!(writes(&w).len(), 1, "no write while the lease is live");
    assert!(b.try_acquire_or_renew(t + Duration::seconds(16)).await.unwrap());
    let lease = w.lock().unwrap().leases["segment-operator"].clone().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("pod-b"));
    assert_eq!(lease.lease_transitions, Some(1));
    // pod-a comes back and finds it lost the lease.
    assert!(!lock(&w, "pod-a").try_acquire_or_renew(t + Duration::seconds(17)).await.unwrap());
}

#[tokio::test]
async fn a_write_on_a_stale_read_loses_instead_of_making_two_leaders() {
    let w = world();
    let t = Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap();
    assert!(lock(&w, "pod-a").try_acquire_or_renew(t).await.unwrap());
    // pod-b reads an expired lease, but pod-c writes first: pod-b's replace
    // carries the old resourceVersion and loses.
    w.lock().unwrap().conflict_next_lease_write = true;
    let b = lock(&w, "pod-b");
    assert!(!b.try_acquire_or_renew(t + Duration::seconds(60)).await.unwrap());
    let holder = w.lock().unwrap().leases["segment-operator"].spec.clone().unwrap().holder_identity;
    assert_eq!(holder.as_deref(), Some("pod-a"));
    assert_eq!(writes(&w).last().unwrap(), &format!("PUT {LEASES}/segment-operator"));
    // With no one racing, the next attempt takes it.
    assert!(b.try_acquire_or_renew(t + Duration::seconds(61)).await.unwrap());
}
