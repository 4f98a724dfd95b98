//! The lifecycle of a Segment as a pure function.
//!
//! [`plan`] takes a Segment (spec, status, annotations), what was observed
//! (its Jobs, the store) and the time, and returns the status to write, the
//! actions to take and when to look again. It keeps nothing between calls:
//! everything it needs is in the status, the Jobs and the store, so a
//! restarted operator continues a run where the previous one left it.
//!
//! [`crate::executor`] carries a plan out, in the one order that keeps
//! every crash point recoverable (store, status, Jobs, Events).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};

use crate::api::*;
use crate::definition::definition_hash;
use crate::duration::parse_duration;
use crate::naming::{results_uri, run_job_name, JobKind};
use crate::reasons::{ConditionType, EventReason, FailureReason, HoldReason};
use crate::schedule::CronSchedule;
use crate::seal::{judge, Verdict, SEAL_FILE};
use crate::store::{ResultStore, Seal, SegmentStore, StoreError, StoredVersion};
use crate::task::Failure;
use crate::validation::{check_spec, Invalid};

/// Operator settings that shape plans.
#[derive(Debug, Clone)]
pub struct PlannerConfig {
    /// Base URI of result files (`s3://bucket/prefix`), recorded per version.
    pub results_base: Option<String>,
    /// Failed runs kept in `status.versions` for people to read.
    pub failed_history: usize,
    /// How often expired result files are collected.
    pub results_collect_interval: Duration,
    /// Safety-net requeue while a run is in flight (Job changes also wake
    /// the controller).
    pub poll_interval: Duration,
    /// First retry delay after a transient failure; doubles each time.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Consecutive transient failures retried before waiting for the next
    /// scheduled run.
    pub max_retries: u32,
    /// A Job whose pod is not running this long after the Job was created
    /// fails the run with the reason the adapter found (an image that
    /// cannot be pulled, no node, a missing Secret or ServiceAccount).
    pub pod_start_timeout: Duration,
    /// A Job still running this long past its own deadline (the Job
    /// controller did not stop it) fails the run as `DeadlineExceeded`.
    pub deadline_grace: Duration,
    /// How long a version readers were switched away from is kept anyway:
    /// longer than a serving replica takes to learn of a switch (at most
    /// its alias refresh interval plus its cache TTL when it missed the
    /// notice).
    pub reader_grace: Duration,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            results_base: None,
            failed_history: 5,
            results_collect_interval: Duration::hours(1),
            poll_interval: Duration::seconds(60),
            retry_base: Duration::seconds(30),
            retry_max: Duration::minutes(15),
            max_retries: 5,
            pod_start_timeout: Duration::minutes(5),
            deadline_grace: Duration::minutes(2),
            reader_grace: Duration::seconds(60),
        }
    }
}

/// A Job of this segment as the adapter saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedJob {
    pub name: String,
    pub version: u64,
    pub kind: JobKind,
    pub state: JobState,
    /// When the Job was created; the planner's own timeouts count from it.
    pub created_at: Option<DateTime<Utc>>,
    /// The Job's `activeDeadlineSeconds`.
    pub deadline: Option<Duration>,
    /// Why a running Job's pod has not started, when the adapter looked
    /// (it looks once the Job is older than the pod start timeout).
    pub not_started: Option<Failure>,
}

impl ObservedJob {
    /// A Job with nothing known of its timing.
    pub fn new(name: impl Into<String>, version: u64, kind: JobKind, state: JobState) -> ObservedJob {
        ObservedJob { name: name.into(), version, kind, state, created_at: None, deadline: None, not_started: None }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    Running,
    Succeeded { finished_at: DateTime<Utc> },
    Failed { finished_at: DateTime<Utc>, failure: Failure },
}

/// What the store holds for the segment, and what sealing the run in
/// flight needs ([`observe_seal`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoreView {
    pub active: Option<u64>,
    /// Sealed versions, each with the member count and the change ingest
    /// counted (the rollover guard's numbers).
    pub versions: BTreeMap<u64, StoredVersion>,
    /// Versions with data but no seal ([`SegmentStore::unsealed_versions`]).
    pub unsealed: BTreeSet<u64>,
    /// The run in flight's version when it was deleted (fenced) while it
    /// was ingested: it can never be sealed.
    pub fenced: BTreeSet<u64>,
    /// Ingest's verdict on the run in flight, read once its ingest Job
    /// succeeded while the store does not list the version.
    pub verdict: Option<Verdict>,
}

/// Everything a plan is made from.
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    pub segment: &'a Segment,
    pub jobs: &'a [ObservedJob],
    pub store: &'a StoreView,
    /// `table` of every SegmentSource in the namespace; `None` skips the
    /// unknown-table check.
    pub source_tables: Option<&'a [String]>,
    /// Whether the cluster-wide compute limit leaves room for one more Job.
    pub compute_slot_free: bool,
    pub now: DateTime<Utc>,
    /// What the namespace's ComputeClass does not allow of the spec
    /// ([`crate::policy::check_allowed`]); it stops launches like an
    /// invalid spec does.
    pub not_allowed: Option<&'a Invalid>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub status: SegmentStatus,
    pub actions: Vec<Action>,
    /// When to plan again even if nothing changes.
    pub requeue_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Switch readers to `version` atomically.
    Activate {
        version: u64,
        previous: Option<u64>,
    },
    /// Seal `version` in the store with ingest's verdict on it (the run
    /// in flight, its ingest Job done). Comes before every other store
    /// action of the plan, which treats the version as sealed.
    Seal {
        version: u64,
        seal: Seal,
    },
    /// Remove a version from the store (incrementally).
    DeleteVersion {
        version: u64,
    },
    /// Delete result files computed before `older_than`, except `keep`.
    CollectResults {
        older_than: DateTime<Utc>,
        keep: Vec<u64>,
    },
    /// Forget realtime overrides from before `older_than`: every version
    /// kept reflects them through its lake data.
    PruneOverrides {
        older_than: DateTime<Utc>,
    },
    /// Delete the Jobs of a run that was cancelled.
    CancelJobs {
        version: u64,
    },
    /// Create a compute or ingest Job.
    Launch(Launch),
    Event(Event),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub kind: JobKind,
    pub version: u64,
    pub job_name: String,
    pub snapshot_time: DateTime<Utc>,
    pub definition_hash: String,
    pub generation: i64,
}

/// An Event to publish on the Segment; its reason says whether it is a
/// warning ([`EventReason::is_warning`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub reason: EventReason,
    pub message: String,
}

impl Event {
    pub fn is_warning(&self) -> bool {
        self.reason.is_warning()
    }
}

/// Reads what the planner needs from the store: the active version, the
/// sealed versions (with the member count and change recorded when each
/// was sealed), the unsealed ones, and, while the run in flight is
/// ingested and its version not sealed, whether that version was deleted
/// meanwhile (fenced: it can never be sealed).
pub async fn observe_store(
    store: &dyn SegmentStore,
    segment: &SegmentKey,
    status: Option<&SegmentStatus>,
) -> Result<StoreView, StoreError> {
    let active = store.active_version(segment).await?;
    let versions = store.versions(segment).await?;
    let unsealed = store.unsealed_versions(segment).await?;
    let ingesting = status
        .and_then(|s| s.current_run.as_ref())
        .filter(|run| run.phase == RunPhase::Ingesting && !versions.contains_key(&run.version))
        .map(|run| run.version);
    let mut fenced = BTreeSet::new();
    if let Some(version) = ingesting {
        if store.is_fenced(segment, version).await? {
            fenced.insert(version);
        }
    }
    Ok(StoreView { active, versions, unsealed, fenced, verdict: None })
}

/// Reads ingest's verdict on the run in flight into `view`, once its
/// ingest Job succeeded while the store neither lists its version nor
/// fenced it (nothing is read otherwise): its seal file, judged against
/// the run ([`crate::seal::judge`]). The cluster and standalone mode both
/// call it after [`observe_store`]; the plan then seals the version from
/// the verdict ([`Action::Seal`]) or fails the run.
pub async fn observe_seal(
    results: &dyn ResultStore,
    segment: &SegmentKey,
    status: Option<&SegmentStatus>,
    jobs: &[ObservedJob],
    view: &mut StoreView,
) -> Result<(), StoreError> {
    let Some(run) = status.and_then(|s| s.current_run.as_ref()).filter(|run| run.phase == RunPhase::Ingesting) else {
        return Ok(());
    };
    if !ingest_succeeded(jobs, run.version) || view.versions.contains_key(&run.version) || view.fenced.contains(&run.version) {
        return Ok(());
    }
    let bytes = results.seal_file(segment, run.version).await?;
    view.verdict = Some(judge(bytes.as_deref(), segment, run));
    Ok(())
}

fn ingest_succeeded(jobs: &[ObservedJob], version: u64) -> bool {
    jobs.iter().any(|j| j.version == version && j.kind == JobKind::Ingest && matches!(j.state, JobState::Succeeded { .. }))
}

/// The version the plan seals and what with: the run in flight of the
/// current definition, its ingest Job done, not in the store nor deleted,
/// with a sound verdict.
fn to_seal(obs: &Observation<'_>, def_hash: &str) -> Option<(u64, Seal)> {
    let run = obs.segment.status.as_ref()?.current_run.as_ref()?;
    let store = obs.store;
    let due = run.phase == RunPhase::Ingesting
        && run.definition_hash == def_hash
        && ingest_succeeded(obs.jobs, run.version)
        && !store.versions.contains_key(&run.version)
        && !store.fenced.contains(&run.version);
    match &store.verdict {
        Some(Verdict::Sealable(seal)) if due => Some((run.version, seal.clone())),
        _ => None,
    }
}

/// Decides what to do next. Pure: the same observation gives the same plan.
pub fn plan(obs: &Observation<'_>, cfg: &PlannerConfig) -> Plan {
    let segment = obs.segment;
    let spec = &segment.spec;
    let previous = segment.status.clone().unwrap_or_default();
    let def_hash = definition_hash(&spec.definition);

    // A version sealed from ingest's verdict is sealed first: the rest of
    // the plan (the rollover guard, the switch, retention) treats it as in
    // the store, and the executor seals before any other store action.
    let sealing = to_seal(obs, &def_hash);
    let sealed_view;
    let sealed_obs;
    let obs = match &sealing {
        Some((version, seal)) => {
            let mut view = obs.store.clone();
            view.versions.insert(*version, seal.stored(false));
            sealed_view = view;
            sealed_obs = Observation { store: &sealed_view, ..obs.clone() };
            &sealed_obs
        }
        None => obs,
    };
    let mut p = Planner {
        obs,
        cfg,
        st: previous.clone(),
        actions: Vec::new(),
        pin_problem: None,
        launch_blocked: false,
        lost_versions: false,
    };
    if let Some((version, seal)) = sealing {
        p.actions.push(Action::Seal { version, seal });
    }

    // The same checks as `segment-operator check`, so a spec that never
    // met the API server's CEL rules (standalone mode) is judged alike.
    let problem =
        check_spec(spec, obs.source_tables).map(|checked| checked.schedule).and_then(|schedule| match obs.not_allowed {
            Some(not_allowed) => Err(not_allowed.clone()),
            None => Ok(schedule),
        });
    // An invalid spec launches nothing, not even the next Job of a run in
    // flight: the run stays where it is and continues once the spec is fixed.
    p.launch_blocked = problem.is_err();

    p.sync_with_store();
    p.advance_run(&def_hash);
    if let Ok(schedule) = &problem {
        p.start_run_if_due(&def_hash, schedule.as_ref());
    }
    p.launch_pending();
    p.cancel_stray_jobs();
    p.roll_over();
    p.retain();
    p.collect_results();
    p.st.next_schedule_time = match &problem {
        Ok(Some(schedule)) if !p.suspended() => schedule.next_after(obs.now),
        _ => None,
    };
    p.set_conditions(problem.as_ref().err(), &def_hash, &previous);
    p.st.observed_generation = segment.metadata.generation;
    let requeue_at = p.requeue_at();
    Plan { status: p.st, actions: p.actions, requeue_at }
}

struct Planner<'o, 'a> {
    obs: &'o Observation<'a>,
    cfg: &'o PlannerConfig,
    st: SegmentStatus,
    actions: Vec<Action>,
    pin_problem: Option<String>,
    launch_blocked: bool,
    /// Servable versions vanished from the store in this plan. Only this
    /// plan knows: `sync_with_store` drops them from the status.
    lost_versions: bool,
}

impl Planner<'_, '_> {
    fn spec(&self) -> &SegmentSpec {
        &self.obs.segment.spec
    }

    fn now(&self) -> DateTime<Utc> {
        self.obs.now
    }

    fn suspended(&self) -> bool {
        self.spec().schedule.as_ref().is_some_and(|s| s.suspend)
    }

    fn event(&mut self, reason: EventReason, message: String) {
        self.actions.push(Action::Event(Event { reason, message }));
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.obs.segment.metadata.annotations.as_ref().and_then(|a| a.get(key)).map(String::as_str)
    }

    fn job(&self, version: u64, kind: JobKind) -> Option<&ObservedJob> {
        self.obs.jobs.iter().find(|j| j.version == version && j.kind == kind)
    }

    fn is_servable(state: VersionState) -> bool {
        matches!(state, VersionState::Active | VersionState::Retained)
    }

    /// Makes the status agree with the store: loaded versions it does not
    /// list are adopted (status lost or written by an older operator),
    /// versions the store no longer has are dropped, and the version
    /// counter never goes below anything that exists.
    fn sync_with_store(&mut self) {
        let store = self.obs.store;
        let in_flight = self.st.current_run.as_ref().map(|r| r.version);
        let mut lost = Vec::new();
        self.st.versions.retain(|v| {
            let keep = !Self::is_servable(v.state) || store.versions.contains_key(&v.version);
            if !keep {
                lost.push(v.version);
            }
            keep
        });
        // A version whose delete was interrupted is unsealed, not lost:
        // the sweep below finishes the delete.
        lost.retain(|v| !store.unsealed.contains(v));
        self.lost_versions = !lost.is_empty();
        for version in lost {
            self.event(EventReason::VersionLost, format!("v{version} is no longer in the store and cannot be served"));
        }
        for (version, stored) in &store.versions {
            let known = self.st.versions.iter().any(|v| v.version == *version);
            if known || Some(*version) == in_flight {
                continue;
            }
            // Not in the status (lost, or the Segment was deleted with
            // `deletionPolicy: Retain` and created again): a version readers
            // were once switched to is adopted for rollback; one that never
            // passed the rollover guard (a held version, a cancelled run's)
            // must not become servable, so it goes.
            // The active version was promoted whatever the store recorded
            // (a store written before promotions were recorded). A pinned
            // one is held: neither served nor deleted while the pin names it.
            if !stored.promoted && store.active != Some(*version) {
                let version = *version;
                if self.spec().pin_version == Some(version) {
                    continue;
                }
                self.delete_version(version);
                self.event(
                    EventReason::VersionDiscarded,
                    format!("v{version} is in the store but not in the status and was never served; deleted"),
                );
                continue;
            }
            self.st.versions.push(VersionStatus {
                version: *version,
                state: VersionState::Retained,
                members: Some(stored.members),
                snapshot_time: stored.snapshot_time.unwrap_or(self.obs.now),
                computed_at: None,
                ingested_at: None,
                results_uri: self.results_uri(*version),
                definition_hash: stored.definition_hash.clone().unwrap_or_default(),
                reason: None,
                message: None,
                generation: None,
                retired_at: None,
                table_versions: stored.table_versions.clone(),
            });
        }
        // Data of no version the status follows: a dead ingest's partial
        // load, an interrupted delete. Deleting it again resumes the delete;
        // every plan looks, so nothing a segment owns leaks for long.
        let unsealed_leftovers: Vec<u64> = store.unsealed.iter().copied().filter(|v| Some(*v) != in_flight).collect();
        for version in unsealed_leftovers {
            self.delete_version(version);
        }
        let failed_but_stored: Vec<u64> = self
            .st
            .versions
            .iter()
            .filter(|v| v.state == VersionState::Failed && store.versions.contains_key(&v.version))
            .map(|v| v.version)
            .collect();
        for version in failed_but_stored {
            self.delete_leftover(version);
        }
        let highest = [
            store.versions.keys().next_back().copied(),
            store.active,
            self.obs.jobs.iter().map(|j| j.version).max(),
            in_flight,
            self.st.versions.iter().map(|v| v.version).max(),
        ];
        self.st.latest_version = highest.into_iter().flatten().fold(self.st.latest_version, u64::max);
    }

    /// Deletes what a failed or cancelled run left in the store. The
    /// version readers see now is left alone: the adapter runs store actions
    /// in plan order, and the switch away from it (`roll_over`) comes later
    /// in the plan; the next plan deletes it as a failed version still
    /// stored. A complete pinned version waits for the pin to move.
    fn delete_leftover(&mut self, version: u64) {
        let store = self.obs.store;
        let pinned_and_complete = self.spec().pin_version == Some(version) && store.versions.contains_key(&version);
        if store.active == Some(version) || pinned_and_complete {
            return;
        }
        self.delete_version(version);
    }

    /// Plans one delete of `version`, however many reasons call for it.
    fn delete_version(&mut self, version: u64) {
        let delete = Action::DeleteVersion { version };
        if !self.actions.contains(&delete) {
            self.actions.push(delete);
        }
    }

    fn results_uri(&self, version: u64) -> Option<String> {
        self.cfg.results_base.as_ref().map(|base| results_uri(base, &self.obs.segment.key(), version))
    }

    /// Moves the run in flight along by what its Jobs and the store show.
    fn advance_run(&mut self, def_hash: &str) {
        let Some(mut run) = self.st.current_run.clone() else {
            return;
        };
        if run.definition_hash != def_hash {
            self.cancel_run(&run, "Superseded", "the definition changed; a run of the new definition replaces it");
            return;
        }
        match run.phase {
            RunPhase::Pending => {}
            RunPhase::Computing => match self.job(run.version, JobKind::Compute).map(|j| j.state.clone()) {
                None => self.launch(&run, JobKind::Compute),
                Some(JobState::Running) => {
                    self.fail_if_stuck(&run, JobKind::Compute);
                }
                // Ingesting needs a Job: wait, and take the step once the
                // spec is valid again.
                Some(JobState::Succeeded { .. }) if self.launch_blocked => {}
                Some(JobState::Succeeded { finished_at }) => {
                    run.computed_at = Some(finished_at);
                    run.phase = RunPhase::Ingesting;
                    run.job = Some(run_job_name(&self.obs.segment.key(), run.version, JobKind::Ingest));
                    self.launch(&run, JobKind::Ingest);
                    self.st.current_run = Some(run);
                }
                Some(JobState::Failed { failure, .. }) => self.fail_run(&run, "compute", failure),
            },
            RunPhase::Ingesting => match self.job(run.version, JobKind::Ingest).map(|j| j.state.clone()) {
                None => self.launch(&run, JobKind::Ingest),
                Some(JobState::Running) => {
                    if self.fail_if_stuck(&run, JobKind::Ingest) {
                        self.delete_leftover(run.version);
                    }
                }
                Some(JobState::Failed { failure, .. }) => {
                    // Whatever part of the version was written is invisible
                    // to readers; remove it so it cannot be activated.
                    self.delete_leftover(run.version);
                    self.fail_run(&run, "ingest", failure);
                }
                Some(JobState::Succeeded { finished_at }) => {
                    run.ingested_at = Some(finished_at);
                    self.st.current_run = Some(run.clone());
                    self.guard_and_promote(run);
                }
            },
            RunPhase::AwaitingApproval => self.guard_and_promote(run),
        }
    }

    /// Fails the run when its running Job cannot finish: its pod has not
    /// started within the pod start timeout (with the reason the adapter
    /// found), or it runs past its own deadline and the Job controller did
    /// not stop it. Its Jobs are deleted, which frees the compute slot.
    fn fail_if_stuck(&mut self, run: &RunStatus, kind: JobKind) -> bool {
        let Some(job) = self.job(run.version, kind).cloned() else { return false };
        let Some(created) = job.created_at else { return false };
        let age = self.now() - created;
        let failure = match (&job.not_started, job.deadline) {
            (Some(why), _) if age >= self.cfg.pod_start_timeout => why.clone(),
            (_, Some(deadline)) if age >= deadline + self.cfg.deadline_grace => Failure::new(
                FailureReason::DeadlineExceeded,
                format!("the Job ran past its deadline of {}s and was not stopped", deadline.num_seconds()),
            ),
            _ => return false,
        };
        self.actions.push(Action::CancelJobs { version: run.version });
        self.fail_run(run, kind.as_str(), failure);
        true
    }

    /// Applies the rollover guard to a sealed version: promote it, or hold
    /// it until `approve-version` names it. A version the store does not
    /// list once its ingest Job succeeded fails the run: ingest left no
    /// sound verdict to seal it with, or it was deleted meanwhile.
    fn guard_and_promote(&mut self, mut run: RunStatus) {
        let Some(stored) = self.obs.store.versions.get(&run.version).cloned() else {
            self.delete_leftover(run.version);
            let v = run.version;
            let message = if run.phase == RunPhase::AwaitingApproval {
                format!("v{v} is no longer in the store")
            } else if self.obs.store.fenced.contains(&v) {
                format!("v{v} was deleted while it was ingested and cannot be sealed")
            } else {
                match &self.obs.store.verdict {
                    Some(Verdict::Missing) => format!("the ingest Job succeeded but left no verdict ({SEAL_FILE}) on v{v}"),
                    Some(Verdict::Invalid(why)) => format!("the ingest Job's verdict on v{v} is not sound: {why}"),
                    Some(Verdict::Sealable(_)) | None => format!("the ingest Job succeeded but v{v} is not sealed in the store"),
                }
            };
            self.fail_run(&run, "ingest", Failure::new(FailureReason::IngestIncomplete, message));
            return;
        };
        let approved = self.annotation(APPROVE_VERSION_ANNOTATION).map(str::trim) == Some(run.version.to_string().as_str());
        let rollover = &self.spec().rollover;
        let mut hold = None;
        if stored.members < rollover.min_members {
            hold = Some((
                HoldReason::BelowMinMembers,
                format!("v{} has {} members, fewer than minMembers {}", run.version, stored.members, rollover.min_members),
            ));
        } else if let (Some(max_ratio), Some(active)) = (rollover.max_change_ratio, self.obs.store.active) {
            let active_members = self.obs.store.versions.get(&active).map(|v| v.members);
            if let Some(active_members) = active_members.filter(|_| active != run.version) {
                // Only the change ingest counted from the two versions'
                // index files is trusted: the store holds no member sets
                // to count it otherwise.
                hold = match stored.change {
                    Some(change) if change.from == active => {
                        let ratio = change.changed as f64 / active_members.max(1) as f64;
                        (ratio > max_ratio).then(|| {
                            let message = format!(
                                "v{} changes {} members, {:.1}% of v{active}'s {active_members} (maxChangeRatio {max_ratio})",
                                run.version,
                                change.changed,
                                ratio * 100.0,
                            );
                            (HoldReason::ChangeRatioExceeded, message)
                        })
                    }
                    Some(change) => Some((
                        HoldReason::ChangeNotCounted,
                        format!(
                            "the change of v{} was counted from v{}, not from v{active} that readers are on now, so \
                             maxChangeRatio {max_ratio} cannot be checked",
                            run.version, change.from
                        ),
                    )),
                    None => Some((
                        HoldReason::ChangeNotCounted,
                        format!(
                            "the change of v{} from v{active} could not be counted from their index files (v{active} has \
                             none, or it could not be read), so maxChangeRatio {max_ratio} cannot be checked",
                            run.version
                        ),
                    )),
                };
            }
        }
        match hold {
            Some((reason, message)) if !approved => {
                if run.phase != RunPhase::AwaitingApproval || run.reason.as_deref() != Some(reason.as_str()) {
                    self.event(
                        EventReason::RolloverHeld,
                        format!("{message}; approve with the annotation {APPROVE_VERSION_ANNOTATION}=\"{}\"", run.version),
                    );
                }
                run.phase = RunPhase::AwaitingApproval;
                run.job = None;
                run.reason = Some(reason.as_str().to_string());
                run.message = Some(message);
                self.st.current_run = Some(run);
            }
            Some(_) => self.promote(&run, &stored, true),
            None => self.promote(&run, &stored, false),
        }
    }

    fn promote(&mut self, run: &RunStatus, stored: &StoredVersion, approved: bool) {
        self.st.versions.push(VersionStatus {
            version: run.version,
            state: VersionState::Retained,
            members: Some(stored.members),
            snapshot_time: run.snapshot_time,
            computed_at: run.computed_at,
            ingested_at: run.ingested_at,
            results_uri: self.results_uri(run.version),
            definition_hash: run.definition_hash.clone(),
            reason: None,
            message: None,
            generation: Some(run.generation),
            retired_at: None,
            table_versions: stored.table_versions.clone(),
        });
        self.st.current_run = None;
        self.st.consecutive_failures = 0;
        self.st.retry_at = None;
        self.st.last_successful_time = Some(self.now());
        let how = if approved { " (approved)" } else { "" };
        self.event(EventReason::VersionReady, format!("v{} loaded with {} members{how}", run.version, stored.members));
    }

    fn fail_run(&mut self, run: &RunStatus, stage: &str, failure: Failure) {
        let serving = match self.st.active_version {
            Some(v) => format!("v{v} keeps serving"),
            None => "no version is served yet".to_string(),
        };
        self.event(
            EventReason::RunFailed,
            format!("v{} {stage} failed: {}: {}; {serving}", run.version, failure.reason, failure.message),
        );
        self.record_ended_run(run, failure.reason.as_str(), &failure.message);
        self.st.consecutive_failures = self.st.consecutive_failures.saturating_add(1);
        self.st.retry_at = (failure.is_transient() && self.st.consecutive_failures <= self.cfg.max_retries).then(|| {
            let doublings = (self.st.consecutive_failures - 1).min(16);
            let delay = self.cfg.retry_base * 2i32.pow(doublings);
            self.now() + delay.min(self.cfg.retry_max)
        });
    }

    fn cancel_run(&mut self, run: &RunStatus, reason: &str, message: &str) {
        // This plan may already have queued the run's next Job (its compute
        // finished just now); the adapter would create it after deleting the
        // run's Jobs, leaving a Job of a cancelled run behind.
        self.actions.retain(|a| !matches!(a, Action::Launch(l) if l.version == run.version));
        self.actions.push(Action::CancelJobs { version: run.version });
        if matches!(run.phase, RunPhase::Ingesting | RunPhase::AwaitingApproval) {
            self.delete_leftover(run.version);
        }
        self.event(EventReason::RunCancelled, format!("v{}: {message}", run.version));
        self.record_ended_run(run, reason, message);
    }

    fn record_ended_run(&mut self, run: &RunStatus, reason: &str, message: &str) {
        self.st.versions.push(VersionStatus {
            version: run.version,
            state: VersionState::Failed,
            members: None,
            snapshot_time: run.snapshot_time,
            computed_at: run.computed_at,
            ingested_at: None,
            results_uri: None,
            definition_hash: run.definition_hash.clone(),
            reason: Some(reason.to_string()),
            message: Some(message.to_string()),
            generation: Some(run.generation),
            retired_at: None,
            table_versions: Vec::new(),
        });
        self.st.current_run = None;
    }

    /// Whether `version` failed for a reason only a spec change fixes, and
    /// the spec has changed since its run started.
    fn spec_fix_since_failure(&self, version: &VersionStatus) -> bool {
        let fixed_by_spec =
            |reason: &str| matches!(reason.parse::<FailureReason>(), Ok(FailureReason::JobRejected | FailureReason::OutOfMemory));
        version.state == VersionState::Failed
            && version.reason.as_deref().is_some_and(fixed_by_spec)
            && version.generation.zip(self.obs.segment.metadata.generation).is_some_and(|(ran, now)| now > ran)
    }

    /// Starts at most one run, for the most important due trigger:
    /// no version yet or a new definition, then a manual request, then the
    /// schedule, then a retry. One run satisfies every trigger due with it.
    fn start_run_if_due(&mut self, def_hash: &str, schedule: Option<&CronSchedule>) {
        let now = self.now();
        let suspended = self.suspended();
        let in_flight = self.st.current_run.is_some();
        let newest = self.st.versions.iter().max_by_key(|v| v.version);
        let latest_hash =
            self.st.current_run.as_ref().map(|r| r.definition_hash.as_str()).or(newest.map(|v| v.definition_hash.as_str()));
        let any_servable = self.st.versions.iter().any(|v| Self::is_servable(v.state));
        let automatic = if suspended {
            None
        } else if latest_hash.is_none() {
            Some(RunTrigger::Initial)
        } else if latest_hash != Some(def_hash) {
            Some(RunTrigger::Definition)
        } else if !in_flight && newest.is_some_and(|v| self.spec_fix_since_failure(v)) {
            // The run failed for a setting of the spec (its Job refused,
            // out of memory) and the spec changed since: try the fix.
            Some(RunTrigger::Retry)
        } else if !any_servable && !in_flight && (self.lost_versions || newest.is_some_and(|v| v.state != VersionState::Failed)) {
            // The store lost every version: rebuild, whatever failed before.
            Some(RunTrigger::Initial)
        } else {
            None
        };

        let manual = self
            .annotation(RUN_REQUESTED_ANNOTATION)
            .filter(|value| Some(*value) != self.st.handled_run_request.as_deref())
            .map(str::to_string);

        let mut due = None;
        if let (Some(schedule), false) = (schedule, suspended) {
            // Without a creation time (manifests outside Kubernetes), the
            // newest run this status knows of anchors the schedule; `now`
            // alone would never let a scheduled time fall due.
            let newest_run = self
                .st
                .current_run
                .as_ref()
                .map(|r| r.started_at)
                .into_iter()
                .chain(self.st.versions.iter().map(|v| v.snapshot_time))
                .max();
            let since = self
                .st
                .last_schedule_time
                .or(self.obs.segment.metadata.creation_timestamp.as_ref().map(to_chrono))
                .or(newest_run)
                .unwrap_or(now);
            if let Some(at) = schedule.latest_due(since, now) {
                let deadline = self.spec().schedule.as_ref().and_then(|s| s.starting_deadline_seconds);
                if deadline.is_some_and(|d| now - at > Duration::seconds(d)) {
                    self.st.last_schedule_time = Some(at);
                    self.event(
                        EventReason::MissedSchedule,
                        format!("the run due at {at} is past startingDeadlineSeconds and is skipped"),
                    );
                } else {
                    due = Some(at);
                }
            }
        }
        let retry = !suspended && self.st.retry_at.is_some_and(|t| t <= now);

        let trigger = automatic
            .or(manual.as_ref().map(|_| RunTrigger::Manual))
            .or(due.map(|_| RunTrigger::Schedule))
            .or(retry.then_some(RunTrigger::Retry));
        let Some(trigger) = trigger else { return };

        if let Some(run) = self.st.current_run.clone() {
            let policy = self.spec().schedule.as_ref().map(|s| s.concurrency_policy).unwrap_or_default();
            match policy {
                // Wait: the trigger stays due and is taken once the run ends.
                ConcurrencyPolicy::Forbid => return,
                ConcurrencyPolicy::Replace => {
                    self.cancel_run(&run, "Replaced", "a newer run replaced it (concurrencyPolicy Replace)")
                }
            }
        }

        let snapshot_time = match trigger {
            RunTrigger::Schedule => due.unwrap_or(now),
            _ => now,
        };
        if let Some(request) = manual {
            self.st.handled_run_request = Some(request);
        }
        if let Some(at) = due {
            self.st.last_schedule_time = Some(at);
        }
        self.st.retry_at = None;
        // Each new trigger gets the full retry budget; only retries draw on it.
        if trigger != RunTrigger::Retry {
            self.st.consecutive_failures = 0;
        }
        self.st.latest_version += 1;
        let version = self.st.latest_version;
        self.st.current_run = Some(RunStatus {
            version,
            phase: RunPhase::Pending,
            job: None,
            snapshot_time,
            started_at: now,
            trigger,
            definition_hash: def_hash.to_string(),
            generation: self.obs.segment.metadata.generation.unwrap_or(0),
            computed_at: None,
            ingested_at: None,
            reason: None,
            message: None,
        });
        self.event(EventReason::RunStarted, format!("v{version} started ({trigger:?}), snapshot time {snapshot_time}"));
    }

    /// A pending run gets its compute Job once the cluster-wide limit
    /// leaves a slot.
    fn launch_pending(&mut self) {
        let Some(mut run) = self.st.current_run.clone().filter(|r| r.phase == RunPhase::Pending && !self.launch_blocked) else {
            return;
        };
        if self.obs.compute_slot_free {
            run.phase = RunPhase::Computing;
            run.job = Some(run_job_name(&self.obs.segment.key(), run.version, JobKind::Compute));
            run.reason = None;
            run.message = None;
            self.launch(&run, JobKind::Compute);
        } else {
            run.reason = Some("WaitingForComputeSlot".into());
            run.message = Some("the cluster-wide limit of concurrent compute Jobs is reached".into());
        }
        self.st.current_run = Some(run);
    }

    /// Jobs still running for a version other than the run in flight
    /// belong to a run that ended: the operator stopped between writing the
    /// status that ended it and deleting its Jobs. Left alone, a compute Job
    /// holds a slot of the cluster-wide limit and an ingest Job loads a
    /// version nobody will promote.
    fn cancel_stray_jobs(&mut self) {
        let in_flight = self.st.current_run.as_ref().map(|r| r.version);
        let stray: BTreeSet<u64> = self
            .obs
            .jobs
            .iter()
            .filter(|j| j.state == JobState::Running && Some(j.version) != in_flight)
            .map(|j| j.version)
            .collect();
        for version in stray {
            if !self.actions.contains(&Action::CancelJobs { version }) {
                self.actions.push(Action::CancelJobs { version });
            }
        }
    }

    fn launch(&mut self, run: &RunStatus, kind: JobKind) {
        if self.launch_blocked {
            return;
        }
        self.actions.push(Action::Launch(Launch {
            kind,
            version: run.version,
            job_name: run_job_name(&self.obs.segment.key(), run.version, kind),
            snapshot_time: run.snapshot_time,
            definition_hash: run.definition_hash.clone(),
            generation: run.generation,
        }));
    }

    /// Serves the pinned version, or else the newest promoted one.
    fn roll_over(&mut self) {
        let servable: BTreeSet<u64> = self.st.versions.iter().filter(|v| Self::is_servable(v.state)).map(|v| v.version).collect();
        let observed = self.obs.store.active;
        let desired = match self.spec().pin_version {
            Some(pin) if servable.contains(&pin) => Some(pin),
            Some(pin) => {
                let retained: Vec<String> = servable.iter().map(|v| format!("v{v}")).collect();
                self.pin_problem = Some(format!(
                    "pinVersion {pin} is not a retained version (retained: {})",
                    if retained.is_empty() { "none".to_string() } else { retained.join(", ") }
                ));
                observed.filter(|v| servable.contains(v)).or(servable.last().copied())
            }
            None => servable.last().copied(),
        };
        if let Some(version) = desired.filter(|d| Some(*d) != observed) {
            self.actions.push(Action::Activate { version, previous: observed });
            let (reason, verb) = match observed {
                Some(old) if old > version => (EventReason::RolledBack, format!("from v{old} back to v{version}")),
                Some(old) => (EventReason::RolledOver, format!("from v{old} to v{version}")),
                None => (EventReason::RolledOver, format!("to v{version}")),
            };
            self.event(reason, format!("readers switched {verb}"));
        }
        let now = self.now();
        for v in self.st.versions.iter_mut().filter(|v| Self::is_servable(v.state)) {
            if Some(v.version) == desired {
                v.state = VersionState::Active;
                v.retired_at = None;
            } else {
                // The version readers are on now starts its reader grace
                // when they are switched away from it.
                if Some(v.version) == observed && desired != observed {
                    v.retired_at = Some(now);
                }
                v.state = VersionState::Retained;
            }
        }
        self.st.active_version = desired;
        self.st.members = desired.and_then(|d| self.obs.store.versions.get(&d)).map(|v| v.members);
    }

    /// Keeps `keepVersions` servable versions (always the active, the
    /// pinned and the one readers see now) and a short failure history.
    fn retain(&mut self) {
        let keep = self.spec().retention.keep_versions.max(1) as usize;
        // The version readers see now is protected while no switch away
        // from it is planned; once it is, `roll_over` has set its
        // `retired_at`, and the reader grace protects it instead: replicas
        // that have not learned of the switch still answer from it.
        let switching = self.st.active_version.is_some_and(|d| Some(d) != self.obs.store.active);
        let serving_now = if switching { None } else { self.obs.store.active };
        let grace_from = self.now() - self.cfg.reader_grace;
        let recently_served = self
            .st
            .versions
            .iter()
            .filter(|v| Self::is_servable(v.state) && v.retired_at.is_some_and(|t| t > grace_from))
            .map(|v| v.version)
            .collect::<Vec<_>>();
        let protected: BTreeSet<u64> =
            [self.st.active_version, self.spec().pin_version, serving_now].into_iter().flatten().chain(recently_served).collect();
        self.st.versions.sort_by_key(|v| std::cmp::Reverse(v.version));
        let mut kept = self.st.versions.iter().filter(|v| Self::is_servable(v.state) && protected.contains(&v.version)).count();
        let mut failed_kept = 0;
        let mut deleted = Vec::new();
        self.st.versions.retain(|v| {
            if Self::is_servable(v.state) {
                if protected.contains(&v.version) {
                    return true;
                }
                if kept < keep {
                    kept += 1;
                    return true;
                }
                deleted.push(v.version);
                false
            } else if v.state == VersionState::Failed {
                failed_kept += 1;
                failed_kept <= self.cfg.failed_history
            } else {
                true
            }
        });
        let pruning = !deleted.is_empty();
        for version in deleted {
            self.delete_version(version);
            self.event(EventReason::VersionDeleted, format!("v{version} deleted by retention (keepVersions {keep})"));
        }
        if pruning {
            self.prune_overrides();
        }
    }

    /// Once retention deleted versions, the overrides none of the versions
    /// kept needs go: those from before what every one of them reflects.
    /// Not while a run is in flight (its ingest reads overrides from its
    /// own time on), nor when a version kept does not say what it reflects.
    fn prune_overrides(&mut self) {
        if self.st.current_run.is_some() {
            return;
        }
        let stored = &self.obs.store.versions;
        let reflected: Option<Vec<DateTime<Utc>>> = self
            .st
            .versions
            .iter()
            .filter(|v| Self::is_servable(v.state))
            .map(|v| stored.get(&v.version).and_then(|s| s.reflects_events_until()))
            .collect();
        if let Some(older_than) = reflected.and_then(|times| times.into_iter().min()) {
            self.actions.push(Action::PruneOverrides { older_than });
        }
    }

    fn collect_results(&mut self) {
        let Ok(keep_for) = parse_duration(&self.spec().retention.keep_results_for) else {
            return;
        };
        let now = self.now();
        let due = self.st.results_collected_at.is_none_or(|t| now - t >= self.cfg.results_collect_interval);
        if !due || self.st.versions.is_empty() {
            return;
        }
        let mut keep: Vec<u64> =
            [self.st.active_version, self.spec().pin_version, self.st.current_run.as_ref().map(|r| r.version)]
                .into_iter()
                .flatten()
                .collect();
        keep.sort_unstable();
        keep.dedup();
        self.actions.push(Action::CollectResults { older_than: now - keep_for, keep });
        self.st.results_collected_at = Some(now);
    }

    fn set_conditions(&mut self, problem: Option<&Invalid>, def_hash: &str, previous: &SegmentStatus) {
        let newest = self.st.versions.iter().max_by_key(|v| v.version).cloned();
        let newest_failed = newest
            .as_ref()
            .filter(|v| v.state == VersionState::Failed && !matches!(v.reason.as_deref(), Some("Superseded" | "Replaced")));
        let realized = self.st.versions.iter().any(|v| Self::is_servable(v.state) && v.definition_hash == def_hash);
        let serving = self.st.active_version.map(|v| format!("v{v} serves {} members", self.st.members.unwrap_or(0)));
        let run = self.st.current_run.clone();

        let (ready, stalled, reconciling): (Cond, Cond, Cond) = if let Some(problem) = problem {
            let (reason, message) = (problem.reason.as_str(), problem.to_string());
            let message = match &serving {
                Some(s) => format!("{message}; nothing is launched and {s}"),
                None => format!("{message}; nothing is launched"),
            };
            (Cond::f(reason, &message), Cond::t(reason, &message), Cond::f("NotReconciling", "the spec is invalid"))
        } else if let Some(pin) = &self.pin_problem {
            (Cond::f("PinnedVersionUnavailable", pin), Cond::t("PinnedVersionUnavailable", pin), Cond::f("NotReconciling", ""))
        } else {
            let ready = match (&serving, newest_failed, &run) {
                (Some(s), Some(failed), _) => Cond::t("LastRunFailed", &format!("{s}; {}", failure_text(failed))),
                (Some(s), None, _) => Cond::t("VersionActive", s),
                (None, _, Some(run)) => Cond::f(&format!("{:?}", run.phase), &format!("v{} is {:?}", run.version, run.phase)),
                (None, Some(failed), None) => Cond::f("RunFailed", &failure_text(failed)),
                (None, None, None) if self.suspended() => Cond::f("Suspended", "no version yet and the schedule is suspended"),
                (None, None, None) => Cond::f("NoVersion", "no version has been computed yet"),
            };
            let reconciling = match (&run, realized) {
                (Some(run), false) => {
                    Cond::t("RunInProgress", &format!("v{} of the current definition is {:?}", run.version, run.phase))
                }
                _ => Cond::f("NotReconciling", ""),
            };
            let stalled = match (newest_failed, &run, realized) {
                // The Job itself is refused: nothing runs until the spec
                // changes, whatever versions exist.
                (Some(failed), None, _) if failed.reason.as_deref() == Some(FailureReason::JobRejected.as_str()) => {
                    Cond::t(FailureReason::JobRejected.as_str(), &failure_text(failed))
                }
                (Some(failed), None, false) if self.st.retry_at.is_none() => {
                    Cond::t("RunFailed", &format!("the current definition has no version: {}", failure_text(failed)))
                }
                _ => Cond::f("NotStalled", ""),
            };
            (ready, stalled, reconciling)
        };
        let held = match run.as_ref().filter(|r| r.phase == RunPhase::AwaitingApproval) {
            Some(run) => Cond::t(run.reason.as_deref().unwrap_or("Held"), run.message.as_deref().unwrap_or("")),
            None => Cond::f("NotHeld", ""),
        };

        let prev_ready = previous.conditions.iter().find(|c| c.type_ == ConditionType::Ready.as_str());
        if let Some(problem) = problem {
            let changed = prev_ready.is_none_or(|c| c.reason != ready.reason || c.message != ready.message);
            if changed {
                self.event(problem.reason.into(), ready.message.clone());
            }
        }

        let generation = self.obs.segment.metadata.generation;
        let now = self.now();
        self.st.conditions = [
            (ConditionType::Ready, ready),
            (ConditionType::Reconciling, reconciling),
            (ConditionType::Stalled, stalled),
            (ConditionType::RolloverHeld, held),
        ]
        .into_iter()
        .map(|(type_, c)| {
            let status = if c.status { "True" } else { "False" };
            let since = previous
                .conditions
                .iter()
                .find(|p| p.type_ == type_.as_str() && p.status == status)
                .map(|p| p.last_transition_time)
                .unwrap_or(now);
            Condition {
                type_: type_.as_str().to_string(),
                status: status.to_string(),
                reason: c.reason,
                message: c.message,
                last_transition_time: since,
                observed_generation: generation,
            }
        })
        .collect();
    }

    fn requeue_at(&self) -> Option<DateTime<Utc>> {
        let now = self.now();
        let run = self.st.current_run.as_ref().map(|run| match run.phase {
            RunPhase::Pending => now + Duration::seconds(15),
            _ => now + self.cfg.poll_interval,
        });
        let collect =
            self.st.results_collected_at.filter(|_| !self.st.versions.is_empty()).map(|t| t + self.cfg.results_collect_interval);
        // Retention looks again when a retired version's reader grace ends.
        let grace_ends =
            self.st.versions.iter().filter_map(|v| v.retired_at).map(|t| t + self.cfg.reader_grace).filter(|t| *t > now).min();
        // A sweep that deleted something looks again to confirm it is gone.
        let sweep = self.actions.iter().any(|a| matches!(a, Action::DeleteVersion { .. })).then(|| now + self.cfg.poll_interval);
        // A time already past is one this plan could not act on (a retry
        // while suspended or while the spec is invalid); waking for it would
        // only spin. Spec changes and Job updates wake the controller anyway.
        [self.st.next_schedule_time, self.st.retry_at, run, collect, grace_ends, sweep]
            .into_iter()
            .flatten()
            .filter(|t| *t > now)
            .min()
    }
}

/// `v43 failed: Reason: message`, as conditions quote a failed run.
fn failure_text(failed: &VersionStatus) -> String {
    format!("v{} failed: {}: {}", failed.version, failed.reason.as_deref().unwrap_or(""), failed.message.as_deref().unwrap_or(""))
}

struct Cond {
    status: bool,
    reason: String,
    message: String,
}

impl Cond {
    fn t(reason: &str, message: &str) -> Cond {
        Cond { status: true, reason: reason.to_string(), message: message.to_string() }
    }
    fn f(reason: &str, message: &str) -> Cond {
        Cond { status: false, reason: reason.to_string(), message: message.to_string() }
    }
}

fn to_chrono(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(t.0.as_second(), t.0.subsec_nanosecond() as u32).unwrap_or_default()
}
