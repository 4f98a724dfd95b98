//! Carries a [`Plan`] out: the one place that decides in which order a
//! plan's actions happen.
//!
//! The Kubernetes reconcile, standalone mode and the planner's simulated
//! test world each implement [`Effects`] (where a store write, a status
//! write, a Job or an Event goes) and call [`carry_out`]. The order keeps
//! every crash point recoverable:
//! 1. [`Step::Store`]: store actions. They are idempotent and re-derived
//!    from "desired vs observed" on the next plan if lost.
//! 2. [`Step::Status`]: the status, written only when it changed. It
//!    records a new run before its Job exists (intent first), so a crash
//!    cannot start a run twice.
//! 3. [`Step::Jobs`]: Job deletions and creations, in plan order
//!    (creations tolerate a Job that already exists).
//! 4. [`Step::Events`]: Events, which never fail a reconcile.
//!
//! Both matches on [`Action`] below are exhaustive: a new action does not
//! compile until it is given a step and an effect.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::api::SegmentStatus;
use crate::planner::{Action, Event, Launch, Plan};
use crate::store::Seal;

/// The steps of carrying out a plan, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    Store,
    Status,
    Jobs,
    Events,
}

impl Step {
    pub const ALL: [Step; 4] = [Step::Store, Step::Status, Step::Jobs, Step::Events];

    /// The step an action belongs to.
    pub fn of(action: &Action) -> Step {
        match action {
            Action::Seal { .. }
            | Action::Activate { .. }
            | Action::DeleteVersion { .. }
            | Action::PruneOverrides { .. }
            | Action::CollectResults { .. } => Step::Store,
            Action::CancelJobs { .. } | Action::Launch(_) => Step::Jobs,
            Action::Event(_) => Step::Events,
        }
    }
}

/// Where the effects of one Segment's plan land. An implementation is made
/// for one Segment and knows its key.
#[async_trait]
pub trait Effects: Send {
    type Error: Send;

    /// Seals `version` in the store with ingest's verdict on it
    /// ([`crate::store::SegmentStore::seal_with`]). A store that refuses
    /// (the version was deleted: [`crate::store::StoreError::Fenced`])
    /// fails the plan here, before anything else of it happens; the next
    /// plan observes the fence and fails the run.
    async fn seal(&mut self, version: u64, seal: &Seal) -> Result<(), Self::Error>;
    /// Switches readers to `version` atomically
    /// ([`crate::store::SegmentStore::activate`]); serving lays the realtime
    /// overrides the version does not reflect over its index file.
    /// An implementation may hold the switch (the cluster waits until the
    /// serving replicas have loaded the version,
    /// [`crate::store::replicas_ready`]) by returning an error: the plan
    /// stops there, before its status is written, so the status never
    /// claims a switch that has not happened, and the next plan asks again.
    async fn activate(&mut self, version: u64) -> Result<(), Self::Error>;
    /// Forgets realtime overrides from before `older_than`.
    async fn prune_overrides(&mut self, older_than: DateTime<Utc>) -> Result<(), Self::Error>;
    /// Removes `version` from the store.
    async fn delete_version(&mut self, version: u64) -> Result<(), Self::Error>;
    /// Deletes result files computed before `older_than`, except `keep`.
    async fn collect_results(&mut self, older_than: DateTime<Utc>, keep: &[u64]) -> Result<(), Self::Error>;
    /// Records the Segment's new status.
    async fn write_status(&mut self, status: &SegmentStatus) -> Result<(), Self::Error>;
    /// Deletes the Jobs of a cancelled run.
    async fn cancel_jobs(&mut self, version: u64) -> Result<(), Self::Error>;
    /// Creates a Job; one that already exists is left alone.
    async fn launch(&mut self, launch: &Launch) -> Result<(), Self::Error>;
    /// Publishes an Event. It cannot fail the plan: its effects happened.
    async fn event(&mut self, event: &Event);
}

/// Carries out every step of `plan`. `previous` is the status the plan was
/// made from: an unchanged status is not written again.
pub async fn carry_out<E: Effects + ?Sized>(
    plan: &Plan,
    previous: Option<&SegmentStatus>,
    effects: &mut E,
) -> Result<(), E::Error> {
    carry_out_through(plan, previous, effects, Step::Events).await
}

/// Carries out the steps of `plan` up to and including `last`: what an
/// operator that stops (or crashes) right after `last` leaves behind.
pub async fn carry_out_through<E: Effects + ?Sized>(
    plan: &Plan,
    previous: Option<&SegmentStatus>,
    effects: &mut E,
    last: Step,
) -> Result<(), E::Error> {
    for step in Step::ALL.into_iter().take_while(|step| *step <= last) {
        if step == Step::Status {
            if previous != Some(&plan.status) {
                effects.write_status(&plan.status).await?;
            }
            continue;
        }
        for action in plan.actions.iter().filter(|action| Step::of(action) == step) {
            perform(action, effects).await?;
        }
    }
    Ok(())
}

async fn perform<E: Effects + ?Sized>(action: &Action, effects: &mut E) -> Result<(), E::Error> {
    match action {
        Action::Seal { version, seal } => effects.seal(*version, seal).await,
        Action::Activate { version, .. } => effects.activate(*version).await,
        Action::DeleteVersion { version } => effects.delete_version(*version).await,
        Action::PruneOverrides { older_than } => effects.prune_overrides(*older_than).await,
        Action::CollectResults { older_than, keep } => effects.collect_results(*older_than, keep).await,
        Action::CancelJobs { version } => effects.cancel_jobs(*version).await,
        Action::Launch(launch) => effects.launch(launch).await,
        Action::Event(event) => {
            effects.event(event).await;
            Ok(())
        }
    }
}
