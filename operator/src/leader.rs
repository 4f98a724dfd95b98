//! Leader election through a `coordination.k8s.io/v1` Lease: one replica
//! reconciles, the others wait. A leader that cannot renew in time stops
//! (the process exits and its pod restarts) rather than risk two leaders.

use std::future::Future;

use chrono::{DateTime, Duration, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::Client;
use tracing::{info, warn};

use crate::time::{micro_to_chrono, to_micro};

pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the leader lease {0}: could not renew it in time")]
    Lost(String),
}

impl LeaseLock {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration_seconds: u32) -> Self {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            duration: Duration::seconds(duration_seconds.into()),
        }
    }

    /// Takes the lease if it is free or expired, renews it if it is ours.
    /// Returns whether this replica holds it now. A conflict (another
    /// replica wrote first) is not an error: it just did not win.
    pub async fn try_acquire_or_renew(&self, now: DateTime<Utc>) -> Result<bool, kube::Error> {
        let Some(current) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(self.spec(now, now, 0)),
            };
            return ignore_conflict(self.api.create(&PostParams::default(), &lease).await.map(|_| true));
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        let expired = spec.renew_time.as_ref().map(micro_to_chrono).is_none_or(|renewed| {
            let held_for = spec.lease_duration_seconds.map(|s| Duration::seconds(s.into())).unwrap_or(self.duration);
            renewed + held_for < now
        });
        if !(ours || holder.is_empty() || expired) {
            return Ok(false);
        }
        let acquired = if ours { spec.acquire_time.as_ref().map(micro_to_chrono).unwrap_or(now) } else { now };
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let mut lease = current;
        lease.spec = Some(self.spec(acquired, now, transitions));
        // The replace carries the resourceVersion we read, so two replicas
        // taking an expired lease at once cannot both succeed.
        ignore_conflict(self.api.replace(&self.name, &PostParams::default(), &lease).await.map(|_| true))
    }

    fn spec(&self, acquired: DateTime<Utc>, renewed: DateTime<Utc>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.num_seconds() as i32),
            acquire_time: Some(to_micro(acquired)),
            renew_time: Some(to_micro(renewed)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Waits for the lease, then runs `work` while renewing it every third
    /// of its duration. Returns when `work` ends, or with an error once the
    /// lease could not be renewed for a whole lease duration.
    pub async fn run_as_leader<F: Future<Output = ()>>(&self, work: F) -> Result<(), LeaderError> {
        let period = (self.duration / 3).to_std().unwrap_or(std::time::Duration::from_secs(5));
        loop {
            match self.try_acquire_or_renew(Utc::now()).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "could not read the leader lease"),
            }
            tokio::time::sleep(period).await;
        }
        info!(lease = %self.name, identity = %self.identity, "became leader");
        let mut last_renewed = Utc::now();
        let renew = async {
            loop {
                tokio::time::sleep(period).await;
                match self.try_acquire_or_renew(Utc::now()).await {
                    Ok(true) => last_renewed = Utc::now(),
                    Ok(false) => return LeaderError::Lost(self.name.clone()),
                    Err(e) => warn!(error = %e, "could not renew the leader lease"),
                }
                if Utc::now() - last_renewed > self.duration {
                    return LeaderError::Lost(self.name.clone());
                }
            }
        };
        tokio::select! {
            _ = work => Ok(()),
            lost = renew => Err(lost),
        }
    }
}

fn ignore_conflict(result: Result<bool, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        other => other,
    }
}
