//! Two operator replicas with leader election on the real API server:
//! the leader killed (SIGKILL), frozen past its lease (SIGSTOP, then
//! SIGCONT), stopped (SIGTERM) with a reconcile in flight, and the API
//! server itself stopped and started again.
//!
//! Who wrote what, and when, comes from the API server's audit log: each
//! replica names itself in its User-Agent, which the log records with the
//! time the server received the request.

use std::time::Duration;

use chrono::{DateTime, Utc};
use segment_tests::Signal;
use serde_json::{json, Value};

use crate::lifecycle::{active_version, annotate, list, static_segment, RUN};
use crate::{own_cluster, put_object, LocalCluster, Operator, Tenant};

const LEASE_SECONDS: u64 = 6;
const RETRY_SECONDS: u64 = 1;
/// Short election times, so a takeover fits in a test.
const TIMING: [&str; 6] = ["--lease-duration-seconds", "6", "--renew-deadline-seconds", "4", "--retry-period-seconds", "1"];

/// A write the API server accepted, from its audit log.
#[derive(Debug, Clone)]
struct Write {
    received: DateTime<Utc>,
    agent: String,
    verb: String,
    resource: String,
    subresource: String,
    name: String,
}

impl Write {
    fn by(&self, identity: &str) -> bool {
        self.agent.contains(&format!("({identity})"))
    }

    fn is_lease(&self) -> bool {
        self.resource == "leases"
    }
}

/// The successful writes in `namespace` so far, in the order received.
fn writes(cluster: &LocalCluster, namespace: &str) -> Vec<Write> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let mut writes: Vec<Write> = cluster
        .audit_events()
        .into_iter()
        .filter(|e| e["objectRef"]["namespace"] == namespace)
        .filter(|e| e["responseStatus"]["code"].as_u64().is_some_and(|c| c < 300))
        .filter_map(|e| {
            Some(Write {
                received: e["requestReceivedTimestamp"].as_str()?.parse().ok()?,
                agent: text(&e["userAgent"]),
                verb: text(&e["verb"]),
                resource: text(&e["objectRef"]["resource"]),
                subresource: text(&e["objectRef"]["subresource"]),
                name: text(&e["objectRef"]["name"]),
            })
        })
        .collect();
    writes.sort_by_key(|w| w.received);
    writes
}

fn lease_holder(tenant: &Tenant) -> Option<String> {
    let lease = tenant.cluster.get_json(&tenant.namespace, "lease", &format!("{}-segment-operator", tenant.namespace))?;
    lease["spec"]["holderIdentity"].as_str().map(str::to_string)
}

/// The first lease write of `identity` received after `after`: when it
/// took (or renewed) the lease.
fn first_lease_write(writes: &[Write], identity: &str, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    writes.iter().find(|w| w.is_lease() && w.by(identity) && w.received > after).map(|w| w.received)
}

/// Every Job of the namespace was created once.
fn assert_no_job_created_twice(writes: &[Write]) {
    let mut created: Vec<&str> =
        writes.iter().filter(|w| w.verb == "create" && w.resource == "jobs").map(|w| w.name.as_str()).collect();
    let total = created.len();
    created.sort();
    created.dedup();
    assert_eq!(created.len(), total, "a Job was created twice: {created:?}");
}

fn request_run(tenant: &Tenant, segment: &str, at: &str) {
    annotate(tenant, segment, &format!("segmentation.dev/run-requested-at={at}"));
}

/// A tenant with `count` static Segments, each with an active first version.
fn tenant_with_segments(tenant: Tenant, count: usize) -> Tenant {
    for i in 0..count {
        put_object(&tenant.lake_bucket, &format!("lists/s{i}.csv"), &list(1..=3));
        tenant.apply(&static_segment(&tenant, &format!("s{i}"), json!({})));
    }
    tenant
}

fn wait_all_active(tenant: &Tenant, count: usize, version: u64) {
    for i in 0..count {
        tenant.wait_for_segment(&format!("s{i}"), RUN, |s| active_version(s) == Some(version));
    }
}

/// SIGKILL the leader while runs are in flight: the other replica, which
/// did not reconcile while the lease was live, takes over within the lease
/// duration and finishes the runs; no Job is created twice and nothing of
/// the old leader lands after the new one took over.
#[test]
fn a_killed_leader_is_replaced_within_the_lease_duration_and_no_job_is_created_twice() {
    let tenant = tenant_with_segments(Tenant::new("kill"), 4);
    let a = Operator::replica(&tenant, "replica-a", &TIMING);
    tenant.cluster.wait_until("replica-a to lead", RUN, || lease_holder(&tenant).as_deref() == Some("replica-a"));
    let b = Operator::replica(&tenant, "replica-b", &TIMING);
    wait_all_active(&tenant, 4, 1);
    assert!(a.reconciles() > 0);
    assert_eq!(b.reconciles(), 0, "the replica that does not lead does not reconcile");
    assert_eq!(b.metric("segment_operator_leader"), Some(0.0));

    for i in 0..4 {
        request_run(&tenant, &format!("s{i}"), "2030-01-01T00:00:00Z");
    }
    // Mid-work: the leader is reconciling the requests.
    tenant
        .cluster
        .wait_until("replica-a to start a v2 run", RUN, || tenant.segment("s0")["status"]["currentRun"]["version"] == 2);
    a.signal(Signal::Kill);
    let killed = Utc::now();
    tenant.cluster.wait_until("replica-b to lead", RUN, || lease_holder(&tenant).as_deref() == Some("replica-b"));
    wait_all_active(&tenant, 4, 2);

    let writes = writes(tenant.cluster, &tenant.namespace);
    let took_over = first_lease_write(&writes, "replica-b", killed).expect("replica-b's lease write");
    let bound = chrono::Duration::seconds((LEASE_SECONDS + 2 * RETRY_SECONDS) as i64);
    assert!(took_over - killed <= bound, "took over {:?} after the kill", took_over - killed);
    let late: Vec<&Write> = writes.iter().filter(|w| w.by("replica-a") && w.received >= took_over).collect();
    assert!(late.is_empty(), "the old leader wrote after the new one took over: {late:?}");
    assert!(writes.iter().any(|w| w.by("replica-b") && w.subresource == "status"), "replica-b did the work");
    assert_no_job_created_twice(&writes);
}

/// A leader frozen (SIGSTOP) for longer than its lease: the other replica
/// takes over; when the frozen one runs again (SIGCONT) it writes nothing
/// at all, neither Segments nor Jobs nor Events nor the Lease, though its
/// watches deliver a backlog of changes and runs are requested after it
/// resumed.
#[test]
fn a_leader_frozen_past_its_lease_writes_nothing_when_it_resumes() {
    let tenant = tenant_with_segments(Tenant::new("freeze"), 2);
    let mut a = Operator::replica(&tenant, "replica-a", &TIMING);
    tenant.cluster.wait_until("replica-a to lead", RUN, || lease_holder(&tenant).as_deref() == Some("replica-a"));
    let _b = Operator::replica(&tenant, "replica-b", &TIMING);
    wait_all_active(&tenant, 2, 1);

    a.signal(Signal::Stop);
    // While it is frozen: a change its watch will deliver on resume.
    request_run(&tenant, "s0", "2030-01-01T00:00:00Z");
    tenant.cluster.wait_until("replica-b to lead", RUN, || lease_holder(&tenant).as_deref() == Some("replica-b"));
    tenant.wait_for_segment("s0", RUN, |s| active_version(s) == Some(2));

    let resumed = Utc::now();
    a.signal(Signal::Continue);
    // After it resumed: more work that a replica believing it leads would do.
    request_run(&tenant, "s1", "2030-01-01T00:00:00Z");
    tenant.wait_for_segment("s1", RUN, |s| active_version(s) == Some(2));
    std::thread::sleep(Duration::from_secs(2 * LEASE_SECONDS));

    let writes = writes(tenant.cluster, &tenant.namespace);
    let late: Vec<&Write> = writes.iter().filter(|w| w.by("replica-a") && w.received >= resumed).collect();
    assert!(late.is_empty(), "the resumed replica wrote: {late:?}");
    assert!(a.is_running(), "it campaigns again instead of exiting");
    assert_eq!(a.metric("segment_operator_leader"), Some(0.0));
    assert!(a.metric("segment_operator_leadership_lost_total").unwrap_or_default() >= 1.0);
    assert_eq!(lease_holder(&tenant).as_deref(), Some("replica-b"));
    assert_no_job_created_twice(&writes);
}

/// SIGTERM with a reconcile in flight (its store read held up by a frozen
/// Redis): the reconcile finishes and writes its effects after the signal,
/// the process exits 0 and releases the lease, and the other replica takes
/// it about a retry period later, not a lease duration. Then the second
/// leader is stopped with a reconcile that outlasts its grace period: it
/// exits at the end of the grace period, and releases the lease too.
#[test]
fn sigterm_finishes_the_reconciles_in_flight_releases_the_lease_and_the_other_takes_over_at_once() {
    let tenant = tenant_with_segments(Tenant::new("sigterm"), 1);
    let patient = [&TIMING[..], &["--store-timeout-ms", "60000", "--shutdown-grace-seconds", "60"]].concat();
    let mut a = Operator::replica(&tenant, "replica-a", &patient);
    tenant.cluster.wait_until("replica-a to lead", RUN, || lease_holder(&tenant).as_deref() == Some("replica-a"));
    let short_grace = [&TIMING[..], &["--store-timeout-ms", "60000", "--shutdown-grace-seconds", "3"]].concat();
    let mut b = Operator::replica(&tenant, "replica-b", &short_grace);
    wait_all_active(&tenant, 1, 1);
    // The first run's last reconciles (its Jobs' final updates) are over
    // before the store freezes, so the one held up below is the request's
    // and not an earlier one with the request queued behind it.
    tenant.cluster.wait_until("no reconcile in flight", RUN, || a.metric("segment_operator_reconciles_in_flight") == Some(0.0));
    std::thread::sleep(Duration::from_secs(1));
    tenant
        .cluster
        .wait_until("still no reconcile in flight", RUN, || a.metric("segment_operator_reconciles_in_flight") == Some(0.0));

    tenant.redis.pause();
    request_run(&tenant, "s0", "2030-01-01T00:00:00Z");
    tenant.cluster.wait_until("a reconcile blocked on the store", RUN, || {
        a.metric("segment_operator_reconciles_in_flight").unwrap_or_default() >= 1.0
    });
    let terminated = Utc::now();
    a.signal(Signal::Terminate);
    std::thread::sleep(Duration::from_secs(2));
    assert!(a.is_running(), "it waits for the reconcile in flight");
    tenant.redis.resume();
    assert_eq!(a.wait_exit(RUN), Some(0), "a clean exit; log:\n{}", a.log());

    let writes_now = writes(tenant.cluster, &tenant.namespace);
    let finished: Vec<&Write> = writes_now.iter().filter(|w| w.by("replica-a") && w.received > terminated).collect();
    assert!(
        finished.iter().any(|w| w.resource == "segments" && w.subresource == "status"),
        "the reconcile in flight wrote its status after SIGTERM: {finished:?}"
    );
    assert!(finished.iter().any(|w| w.resource == "jobs" && w.verb == "create"), "and launched its Job: {finished:?}");
    let released = finished.iter().rev().find(|w| w.is_lease()).expect("the lease released").received;
    assert!(finished.iter().all(|w| w.received <= released), "the release is its last write");
    tenant.cluster.wait_until("replica-b to lead", RUN, || lease_holder(&tenant).as_deref() == Some("replica-b"));
    let took_over =
        first_lease_write(&writes(tenant.cluster, &tenant.namespace), "replica-b", released).expect("b's lease write");
    let bound = chrono::Duration::seconds((2 * RETRY_SECONDS) as i64 + 1);
    assert!(took_over - released <= bound, "took over {:?} after the release", took_over - released);
    // The run replica-a started is finished by replica-b.
    tenant.wait_for_segment("s0", RUN, |s| active_version(s) == Some(2));

    // Now replica-b, with a 3 s grace period, and a store frozen for good.
    tenant.redis.pause();
    request_run(&tenant, "s0", "2031-01-01T00:00:00Z");
    tenant.cluster.wait_until("a reconcile blocked on the store", RUN, || {
        b.metric("segment_operator_reconciles_in_flight").unwrap_or_default() >= 1.0
    });
    b.signal(Signal::Terminate);
    let code = b.wait_exit(Duration::from_secs(30));
    tenant.redis.resume();
    assert_eq!(code, Some(0), "exits at the end of the grace period; log:\n{}", b.log());
    assert!(b.log().contains("shutdown grace period over"), "{}", b.log());
    assert_eq!(lease_holder(&tenant), None, "the lease is released");
}

/// The API server stops answering for longer than a lease, then comes
/// back: the leader stops acting at its renew deadline, both replicas
/// stay up and campaign again, one of them leads, and the work goes on.
/// Writes after the outage never come from two replicas at once. (A
/// cluster of its own: stopping the shared one's API server would stop
/// every other test.)
#[test]
fn an_api_server_outage_leaves_one_leader_and_the_operator_recovers_alone() {
    let cluster = own_cluster();
    let tenant = tenant_with_segments(Tenant::new_on(cluster, "apiserver"), 1);
    let mut a = Operator::replica(&tenant, "replica-a", &TIMING);
    cluster.wait_until("replica-a to lead", RUN, || lease_holder(&tenant).as_deref() == Some("replica-a"));
    let mut b = Operator::replica(&tenant, "replica-b", &TIMING);
    wait_all_active(&tenant, 1, 1);

    cluster.stop_component("kube-apiserver");
    std::thread::sleep(Duration::from_secs(2 * LEASE_SECONDS));
    let back = Utc::now();
    cluster.start_component("kube-apiserver");
    cluster.wait_until("the API server", RUN, || cluster.kubectl(&["get", "--raw", "/readyz"]).success());
    cluster.wait_until("a leader", RUN, || lease_holder(&tenant).is_some());
    request_run(&tenant, "s0", "2030-01-01T00:00:00Z");
    tenant.wait_for_segment("s0", RUN, |s| active_version(s) == Some(2));

    assert!(a.is_running() && b.is_running(), "both replicas recovered without a restart");
    assert!(a.metric("segment_operator_leadership_lost_total").unwrap_or_default() >= 1.0, "the leader stepped down");
    // The terms after the outage do not overlap: each replica's writes
    // (other than the Lease) fall in a span of time no other replica's
    // writes fall in.
    let writes = writes(cluster, &tenant.namespace);
    let span = |identity: &str| {
        let times: Vec<DateTime<Utc>> =
            writes.iter().filter(|w| w.by(identity) && !w.is_lease() && w.received > back).map(|w| w.received).collect();
        Some((*times.first()?, *times.last()?))
    };
    if let (Some((a0, a1)), Some((b0, b1))) = (span("replica-a"), span("replica-b")) {
        assert!(a1 < b0 || b1 < a0, "both replicas wrote in the same span: a {a0}..{a1}, b {b0}..{b1}");
    }
    assert!(span("replica-a").is_some() || span("replica-b").is_some(), "someone did the work");
    assert_no_job_created_twice(&writes);
    cluster.stop();
}
