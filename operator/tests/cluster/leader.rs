//! Leader election against the fake API server: the Lease is created and
//! renewed; another replica's lease is judged expired by the local time
//! since its record last changed (never by its timestamps); a released
//! lease is taken at once; a write on a stale read loses; and a leader
//! whose renews fail stops counting itself leader at the renew deadline.
//! Time is tokio's paused clock.

use crate::fake_api;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use fake_api::World;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use segment_operator::leader::{Leadership, LeaseLock, TermEnd, Timing, TimingError};
use segment_operator::time::to_micro;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";
const CALL: Duration = Duration::from_secs(5);

fn timing() -> Timing {
    Timing::new(Duration::from_secs(15), Duration::from_secs(10), Duration::from_secs(2)).unwrap()
}

fn world() -> fake_api::SharedWorld {
    Arc::new(Mutex::new(World::default()))
}

fn lock(world: &fake_api::SharedWorld, identity: &str) -> LeaseLock {
    LeaseLock::new(fake_api::client(world.clone()), "ops", "segment-operator", identity, timing())
}

fn writes(world: &fake_api::SharedWorld) -> Vec<String> {
    world.lock().unwrap().log.iter().filter(|l| l.method != "GET").map(|l| l.line()).collect()
}

fn lease(world: &fake_api::SharedWorld) -> LeaseSpec {
    world.lock().unwrap().leases["segment-operator"].clone().spec.unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_first_replica_creates_the_lease_and_renews_it() {
    let w = world();
    let a = lock(&w, "pod-a");
    assert!(a.try_acquire_or_renew(CALL).await.unwrap());
    assert_eq!(writes(&w), vec![format!("POST {LEASES}")]);
    let acquired = lease(&w).acquire_time;
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(a.try_acquire_or_renew(CALL).await.unwrap());
    assert_eq!(writes(&w)[1], format!("PUT {LEASES}/segment-operator"));
    let spec = lease(&w);
    assert_eq!(spec.holder_identity.as_deref(), Some("pod-a"));
    assert_eq!(spec.lease_transitions, Some(0));
    assert_eq!(spec.lease_duration_seconds, Some(15));
    assert_eq!(spec.acquire_time, acquired, "renewal keeps the acquire time");
}

#[tokio::test(start_paused = true)]
async fn another_replicas_lease_expires_a_lease_duration_after_it_was_seen_to_change_whatever_its_timestamps() {
    let w = world();
    // pod-a's renewTime is years old by this machine's clock: a candidate
    // that trusted it would take the lease at once.
    let long_ago = to_micro(Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap());
    w.lock().unwrap().leases.insert(
        "segment-operator".into(),
        Lease {
            metadata: ObjectMeta {
                name: Some("segment-operator".into()),
                resource_version: Some("1".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("pod-a".into()),
                lease_duration_seconds: Some(15),
                acquire_time: Some(long_ago.clone()),
                renew_time: Some(long_ago),
                lease_transitions: Some(3),
                ..Default::default()
            }),
        },
    );
    let b = lock(&w, "pod-b");
    assert!(!b.try_acquire_or_renew(CALL).await.unwrap(), "first seen now");
    tokio::time::advance(Duration::from_secs(14)).await;
    assert!(!b.try_acquire_or_renew(CALL).await.unwrap(), "unchanged for 14 s of a 15 s lease");
    assert!(writes(&w).is_empty(), "no write while the lease may be live");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(b.try_acquire_or_renew(CALL).await.unwrap(), "unchanged for 15 s");
    let spec = lease(&w);
    assert_eq!(spec.holder_identity.as_deref(), Some("pod-b"));
    assert_eq!(spec.lease_transitions, Some(4));
    // pod-a comes back, sees pod-b's fresh record and waits.
    assert!(!lock(&w, "pod-a").try_acquire_or_renew(CALL).await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_lease_that_keeps_being_renewed_is_never_taken() {
    let w = world();
    let (a, b) = (lock(&w, "pod-a"), lock(&w, "pod-b"));
    assert!(a.try_acquire_or_renew(CALL).await.unwrap());
    for _ in 0..30 {
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(a.try_acquire_or_renew(CALL).await.unwrap());
        assert!(!b.try_acquire_or_renew(CALL).await.unwrap());
    }
    assert_eq!(lease(&w).holder_identity.as_deref(), Some("pod-a"));
}

#[tokio::test(start_paused = true)]
async fn a_released_lease_is_taken_at_once() {
    let w = world();
    let (a, b) = (lock(&w, "pod-a"), lock(&w, "pod-b"));
    assert!(a.try_acquire_or_renew(CALL).await.unwrap());
    assert!(!b.try_acquire_or_renew(CALL).await.unwrap());
    a.release().await.unwrap();
    assert_eq!(lease(&w).holder_identity, None, "the holder is cleared");
    assert!(b.try_acquire_or_renew(CALL).await.unwrap(), "no lease duration to wait");
    assert_eq!(lease(&w).holder_identity.as_deref(), Some("pod-b"));
    // A replica that no longer holds the lease leaves it alone.
    a.release().await.unwrap();
    assert_eq!(lease(&w).holder_identity.as_deref(), Some("pod-b"));
}

#[tokio::test(start_paused = true)]
async fn a_write_on_a_stale_read_loses_instead_of_making_two_leaders() {
    let w = world();
    assert!(lock(&w, "pod-a").try_acquire_or_renew(CALL).await.unwrap());
    let b = lock(&w, "pod-b");
    assert!(!b.try_acquire_or_renew(CALL).await.unwrap());
    tokio::time::advance(Duration::from_secs(16)).await;
    // pod-b finds the lease expired, but pod-c writes first: pod-b's
    // replace carries the old resourceVersion and loses.
    w.lock().unwrap().conflict_next_lease_write = true;
    assert!(!b.try_acquire_or_renew(CALL).await.unwrap());
    assert_eq!(lease(&w).holder_identity.as_deref(), Some("pod-a"));
    assert_eq!(writes(&w).last().unwrap(), &format!("PUT {LEASES}/segment-operator"));
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_cannot_renew_stops_acting_at_the_renew_deadline_and_drops_its_work() {
    let w = world();
    let a = lock(&w, "pod-a");
    let leadership = Leadership::none();
    assert!(!leadership.is_held());
    a.acquire(&leadership).await;
    let acquired = tokio::time::Instant::now();
    assert!(leadership.is_held());
    w.lock().unwrap().lease_calls_fail = true;
    let observer = {
        let leadership = leadership.clone();
        tokio::spawn(async move {
            // The last instant at which the fence still said "leader".
            let mut last_held = tokio::time::Instant::now();
            while leadership.is_held() {
                last_held = tokio::time::Instant::now();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            last_held
        })
    };
    let work_ran_until = Arc::new(Mutex::new(None));
    let work = {
        let ran = work_ran_until.clone();
        async move {
            loop {
                *ran.lock().unwrap() = Some(tokio::time::Instant::now());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(a.lead(&leadership, work).await, TermEnd::Lost);
    let ended = tokio::time::Instant::now();
    assert!(ended - acquired <= Duration::from_secs(10), "the term ends by the renew deadline: {:?}", ended - acquired);
    assert!(ended - acquired >= Duration::from_secs(8), "and not long before it: {:?}", ended - acquired);
    let last_held = observer.await.unwrap();
    assert!(last_held - acquired < Duration::from_secs(10), "the fence lapsed at the deadline: {:?}", last_held - acquired);
    assert!(!leadership.is_held());
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(work_ran_until.lock().unwrap().unwrap() <= ended, "the work was dropped with the term");
    assert_eq!(lease(&w).holder_identity.as_deref(), Some("pod-a"), "a lost lease is not released (the call would fail)");
}

#[tokio::test(start_paused = true)]
async fn a_term_whose_work_finishes_releases_the_lease() {
    let w = world();
    let a = lock(&w, "pod-a");
    let leadership = Leadership::none();
    a.acquire(&leadership).await;
    let end = a.lead(&leadership, tokio::time::sleep(Duration::from_secs(30))).await;
    assert_eq!(end, TermEnd::Finished);
    assert!(!leadership.is_held());
    let spec = lease(&w);
    assert_eq!(spec.holder_identity, None);
    assert_eq!(spec.lease_transitions, Some(0));
    let renews = writes(&w).iter().filter(|l| l.starts_with("PUT")).count();
    assert!(renews >= 14, "renewed every 2 s through 30 s of work, then released: {renews} PUTs");
}

#[test]
fn the_timing_keeps_the_renew_deadline_inside_the_lease_duration() {
    let s = Duration::from_secs;
    assert_eq!(Timing::new(s(10), s(10), s(2)), Err(TimingError::RenewDeadlineNotBelowLeaseDuration));
    assert_eq!(Timing::new(s(15), s(10), s(10)), Err(TimingError::RetryPeriodNotBelowRenewDeadline));
    assert_eq!(Timing::new(s(15), s(10), s(0)), Err(TimingError::ZeroRetryPeriod));
    assert!(Timing::new(s(15), s(10), s(2)).is_ok());
}

#[test]
fn two_processes_without_a_pod_name_get_different_identities() {
    let (a, b) = (segment_operator::leader::default_identity(), segment_operator::leader::default_identity());
    assert_ne!(a, b);
    let host = hostname::get().unwrap().into_string().unwrap();
    assert!(a.starts_with(&format!("{host}_")), "{a}");
}

/// A Lease call to an API server that accepts the connection and never
/// answers ends at the timeout it was given, with an error that says so.
#[tokio::test]
async fn a_lease_call_to_a_server_that_does_not_answer_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let lock = LeaseLock::new(client, "ops", "segment-operator", "pod-a", timing());
    let started = std::time::Instant::now();
    let error = lock.try_acquire_or_renew(Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(error, segment_operator::leader::LeaseError::Timeout { .. }), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}
