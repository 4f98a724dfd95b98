//! Leader election through a `coordination.k8s.io/v1` Lease, with the
//! guarantees of client-go's `leaderelection` package:
//!
//! - the leader renews every `retry_period` and counts itself leader only
//!   until `renew_deadline` after the *start* of its last successful renew
//!   ([`Leadership`] is that fence, checked before every write);
//! - another replica takes the lease only when it has seen the same record
//!   unchanged for a whole `lease_duration`, measured with its own clock
//!   from the moment it saw the record change (never by comparing the
//!   holder's timestamps with its own clock);
//! - `renew_deadline < lease_duration`, so the old leader has stopped
//!   writing before anyone else may start; the difference absorbs a
//!   write in flight and clocks that run at slightly different rates;
//! - every Lease call is bounded by a timeout;
//! - a leader that stops (SIGTERM) releases the lease, so the next replica
//!   takes it within a `retry_period` instead of a `lease_duration`;
//! - the identity is unique per process unless set (`POD_NAME`).

use std::future::Future;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::time::to_micro;

/// The timing of the election (client-go's names and defaults: 15 s, 10 s,
/// 2 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a non-leader waits, after it last saw the record change,
    /// before it may take the lease.
    pub lease_duration: Duration,
    /// How long the leader keeps acting without a successful renew.
    pub renew_deadline: Duration,
    /// How often the leader renews and a candidate tries.
    pub retry_period: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimingError {
    #[error("--renew-deadline-seconds must be less than --lease-duration-seconds, or two leaders may overlap")]
    RenewDeadlineNotBelowLeaseDuration,
    #[error("--retry-period-seconds must be less than --renew-deadline-seconds, or one failed renew loses the lease")]
    RetryPeriodNotBelowRenewDeadline,
    #[error("--retry-period-seconds must be at least 1")]
    ZeroRetryPeriod,
}

impl Timing {
    pub fn new(lease_duration: Duration, renew_deadline: Duration, retry_period: Duration) -> Result<Timing, TimingError> {
        if retry_period.is_zero() {
            return Err(TimingError::ZeroRetryPeriod);
        }
        if renew_deadline >= lease_duration {
            return Err(TimingError::RenewDeadlineNotBelowLeaseDuration);
        }
        if retry_period >= renew_deadline {
            return Err(TimingError::RetryPeriodNotBelowRenewDeadline);
        }
        Ok(Timing { lease_duration, renew_deadline, retry_period })
    }
}

/// Whether this process may act as leader right now. Cloned into every
/// reconcile; [`Leadership::check`] comes before each write, so a leader
/// that was paused (SIGSTOP, a long GC-like stall, a frozen VM) past its
/// renew deadline writes nothing when it resumes, whatever task wakes
/// first.
#[derive(Clone, Debug)]
pub struct Leadership(Arc<Mutex<Held>>);

#[derive(Clone, Copy, Debug)]
enum Held {
    /// Not leader (not yet, or no more).
    No,
    /// Leader until this instant unless a renew extends it.
    Until(Instant),
    /// The only replica: no election.
    Always,
}

#[derive(Debug, thiserror::Error)]
#[error("not the leader: the leader lease was not renewed within its deadline")]
pub struct NotLeader;

impl Leadership {
    /// Leadership that never lapses: one replica without election.
    pub fn always() -> Leadership {
        Leadership(Arc::new(Mutex::new(Held::Always)))
    }

    /// Not leader until a renew says otherwise.
    pub fn none() -> Leadership {
        Leadership(Arc::new(Mutex::new(Held::No)))
    }

    pub fn is_held(&self) -> bool {
        match self.held() {
            Held::Always => true,
            Held::Until(until) => Instant::now() < until,
            Held::No => false,
        }
    }

    pub fn check(&self) -> Result<(), NotLeader> {
        if self.is_held() {
            Ok(())
        } else {
            Err(NotLeader)
        }
    }

    fn held(&self) -> Held {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The deadline of an elected leader's term.
    fn valid_until(&self) -> Option<Instant> {
        match self.held() {
            Held::Until(until) => Some(until),
            Held::No | Held::Always => None,
        }
    }

    fn hold_until(&self, until: Instant) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Held::Until(until);
    }

    fn revoke(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Held::No;
    }
}

/// A unique identity for this process: the host name and a random suffix
/// (two processes on one host, or a restarted one, never share it).
pub fn default_identity() -> String {
    let host = hostname::get().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "segment-operator".into());
    // RandomState is seeded from the OS's randomness once per process.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    std::process::id().hash(&mut hasher);
    std::time::SystemTime::now().hash(&mut hasher);
    format!("{host}_{:016x}", hasher.finish())
}

/// The part of a Lease that tells whether it changed: the record a
/// candidate has seen, and the local time it saw it change.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    holder: String,
    lease_duration_seconds: Option<i32>,
    acquire_time: Option<String>,
    renew_time: Option<String>,
    transitions: Option<i32>,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Record {
        Record {
            holder: spec.holder_identity.clone().unwrap_or_default(),
            lease_duration_seconds: spec.lease_duration_seconds,
            acquire_time: spec.acquire_time.as_ref().map(|t| t.0.to_string()),
            renew_time: spec.renew_time.as_ref().map(|t| t.0.to_string()),
            transitions: spec.lease_transitions,
        }
    }
}

#[derive(Debug, Clone)]
struct Observed {
    record: Record,
    /// Local (monotonic) time at which `record` was first seen.
    at: Instant,
    /// The lease as last read or written, for the next conditional write.
    lease: Lease,
}

/// Why a Lease call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("{op}: {source}")]
    Api {
        op: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("{op}: no answer within {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
}

pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    /// What was last seen of the Lease. Only one task at a time uses a
    /// lock (the campaign, then the renew loop, then the release), and the
    /// mutex is never held across an API call.
    observed: Mutex<Option<Observed>>,
}

/// What ended a term as leader.
#[derive(Debug, PartialEq, Eq)]
pub enum TermEnd {
    /// The work finished (the operator is stopping); the lease was released.
    Finished,
    /// The lease could not be renewed within the renew deadline, or another
    /// replica holds it: the work was dropped, nothing more was written.
    Lost,
}

impl LeaseLock {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, timing: Timing) -> Self {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
            observed: Mutex::new(None),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn last_observed(&self) -> Option<Observed> {
        self.observed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn observe(&self, observed: Observed) {
        *self.observed.lock().unwrap_or_else(|e| e.into_inner()) = Some(observed);
    }

    /// One API call, bounded by `timeout`.
    async fn call<T>(
        op: &'static str,
        timeout: Duration,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, LeaseError> {
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result.map_err(|source| LeaseError::Api { op, source }),
            Err(_) => Err(LeaseError::Timeout { op, timeout }),
        }
    }

    /// Takes the lease if it is free, released or expired, renews it if it
    /// is ours; each call answers within `timeout`. Returns whether this
    /// replica holds it now. Losing a race (409) is not an error.
    pub async fn try_acquire_or_renew(&self, timeout: Duration) -> Result<bool, LeaseError> {
        let now_local = Instant::now();
        let current = Self::call("reading the leader lease", timeout, self.api.get_opt(&self.name)).await?;
        let Some(current) = current else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(self.spec(None, 0)),
            };
            return match Self::call("creating the leader lease", timeout, self.api.create(&PostParams::default(), &lease)).await {
                Ok(created) => {
                    self.observe(Observed { record: Record::of(&spec_of(&created)), at: now_local, lease: created });
                    Ok(true)
                }
                Err(LeaseError::Api { source: kube::Error::Api(s), .. }) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = spec_of(&current);
        let record = Record::of(&spec);
        // Expiry is judged by our own clock from when we saw the record
        // change; the holder's renewTime is only compared for equality.
        let seen_before = self.last_observed().filter(|o| o.record == record).map(|o| o.at);
        let seen_at = seen_before.unwrap_or(now_local);
        self.observe(Observed { record: record.clone(), at: seen_at, lease: current.clone() });
        let ours = record.holder == self.identity;
        let held_for =
            spec.lease_duration_seconds.map(|s| Duration::from_secs(s.max(0) as u64)).unwrap_or(self.timing.lease_duration);
        let expired = now_local >= seen_at + held_for;
        if !(ours || record.holder.is_empty() || expired) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours { spec.acquire_time.clone() } else { None };
        let mut lease = current;
        lease.spec = Some(self.spec(acquired, transitions));
        // The replace carries the resourceVersion we read, so two replicas
        // taking an expired lease at once cannot both succeed.
        match Self::call("writing the leader lease", timeout, self.api.replace(&self.name, &PostParams::default(), &lease)).await
        {
            Ok(written) => {
                self.observe(Observed { record: Record::of(&spec_of(&written)), at: Instant::now(), lease: written });
                Ok(true)
            }
            Err(LeaseError::Api { source: kube::Error::Api(s), .. }) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up if this replica still holds it: the holder is
    /// cleared, so the next candidate takes it at once.
    pub async fn release(&self) -> Result<(), LeaseError> {
        let Some(observed) = self.last_observed().filter(|o| o.record.holder == self.identity) else { return Ok(()) };
        let mut lease = observed.lease.clone();
        let transitions = observed.record.transitions.unwrap_or(0);
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            acquire_time: Some(to_micro(chrono::Utc::now())),
            renew_time: Some(to_micro(chrono::Utc::now())),
            lease_transitions: Some(transitions),
            ..Default::default()
        });
        // Conditional on our last write: if someone else wrote since, the
        // lease is not ours to release.
        match Self::call(
            "releasing the leader lease",
            self.timing.renew_deadline,
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(LeaseError::Api { source: kube::Error::Api(s), .. }) if s.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn spec(&self, acquired: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime>, transitions: i32) -> LeaseSpec {
        let now = to_micro(chrono::Utc::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease_duration.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Waits until this replica holds the lease (trying every retry
    /// period), then marks `leadership` held.
    pub async fn acquire(&self, leadership: &Leadership) {
        loop {
            let started = Instant::now();
            match self.try_acquire_or_renew(self.timing.renew_deadline).await {
                Ok(true) => {
                    leadership.hold_until(started + self.timing.renew_deadline);
                    info!(lease = %self.name, identity = %self.identity, "became leader");
                    return;
                }
                Ok(false) => debug!(lease = %self.name, "the leader lease is held by another replica"),
                Err(error) => warn!(%error, "could not take the leader lease"),
            }
            tokio::time::sleep_until(started + self.timing.retry_period).await;
        }
    }

    /// Renews every retry period while leader; returns once the lease is
    /// lost (not renewed within the renew deadline after the start of the
    /// last successful renew, or taken by another replica). `leadership`
    /// lapses on its own at that deadline, even if this task is late.
    pub async fn keep_renewing(&self, leadership: &Leadership) {
        loop {
            let Some(until) = leadership.valid_until() else { return };
            tokio::time::sleep(self.timing.retry_period).await;
            let started = Instant::now();
            if started >= until {
                break;
            }
            // A renew that answers after the deadline is worthless: bound
            // the call by what is left of it.
            match self.try_acquire_or_renew(until - started).await {
                Ok(true) => leadership.hold_until(started + self.timing.renew_deadline),
                Ok(false) => {
                    warn!(lease = %self.name, "another replica took the leader lease");
                    break;
                }
                Err(error) => warn!(%error, "could not renew the leader lease"),
            }
        }
        leadership.revoke();
        warn!(lease = %self.name, identity = %self.identity, "lost the leader lease: stopped acting");
    }

    /// One term, once [`LeaseLock::acquire`] returned: runs `work` while
    /// renewing, and releases the lease when `work` ends. If the lease is
    /// lost first, `work` is dropped (its writes were already fenced by
    /// `leadership`).
    pub async fn lead<F: Future<Output = ()>>(&self, leadership: &Leadership, work: F) -> TermEnd {
        let end = tokio::select! {
            _ = work => TermEnd::Finished,
            _ = self.keep_renewing(leadership) => TermEnd::Lost,
        };
        if end == TermEnd::Finished {
            leadership.revoke();
            match self.release().await {
                Ok(()) => info!(lease = %self.name, "released the leader lease"),
                Err(error) => warn!(%error, "could not release the leader lease; it expires on its own"),
            }
        }
        end
    }
}

fn spec_of(lease: &Lease) -> LeaseSpec {
    lease.spec.clone().unwrap_or_default()
}
