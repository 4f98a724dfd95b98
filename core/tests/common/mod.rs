//! A small simulated world for driving the planner end to end: it applies
//! plans the way the operator's adapter does (store actions, then the
//! status, then Jobs, then Events), turns launches into Jobs that tests
//! finish by hand, and writes a version's verdict (its seal file, into a
//! `MemoryResults`) when its ingest Job succeeds, as the worker does; the
//! plans seal it into a `MemoryStore` from there.

#![allow(dead_code)]

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use segment_core::api::*;
use segment_core::definition::definition_hash;
use segment_core::executor::{self, Effects, Step};
use segment_core::naming::{job_name, JobKind};
use segment_core::planner::{self, Action, Event, JobState, Launch, Observation, ObservedJob, Plan, PlannerConfig, StoreView};
pub use segment_core::reasons::{ConditionType, EventReason};
use segment_core::seal::SealFile;
use segment_core::store::{CountedChange, MemoryResults, MemoryStore, Seal, SegmentStore};
use segment_core::task::Failure;

pub const NAME: &str = "vip";
pub const NAMESPACE: &str = "growth";

/// The name of growth/vip's ingest Job of `version`: it carries the
/// namespace and a hash, since it may run in a namespace every tenant shares.
pub fn ingest_job(version: u64) -> String {
    let name = segment_core::naming::run_job_name(
        &segment_core::api::SegmentKey::new(NAMESPACE, NAME),
        version,
        segment_core::naming::JobKind::Ingest,
    );
    assert!(name.starts_with("growth-vip-") && name.ends_with(&format!("-v{version}-ingest")), "{name}");
    name
}
/// `metadata.creationTimestamp` of every test Segment (a Friday).
pub const CREATED: &str = "2024-03-01T10:00:00Z";

pub fn t(text: &str) -> DateTime<Utc> {
    text.parse().unwrap_or_else(|e| panic!("bad time `{text}`: {e}"))
}

/// A Segment named `growth/vip`, generation 1, with the given `spec` YAML.
pub fn segment(spec_yaml: &str) -> Segment {
    let spec: String = spec_yaml.lines().map(|l| format!("  {l}\n")).collect();
    let doc = format!(
        "apiVersion: segmentation.dev/v1alpha1\nkind: Segment\nmetadata:\n  name: {NAME}\n  namespace: {NAMESPACE}\n  \
         generation: 1\n  creationTimestamp: \"{CREATED}\"\nspec:\n{spec}"
    );
    serde_yaml::from_str(&doc).unwrap_or_else(|e| panic!("bad Segment YAML: {e}\n{doc}"))
}

pub fn key() -> SegmentKey {
    SegmentKey::new(NAMESPACE, NAME)
}

pub fn users(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

pub struct World {
    pub segment: Segment,
    pub jobs: Vec<ObservedJob>,
    pub store: MemoryStore,
    /// Where ingest writes its verdicts (seal files).
    pub results: MemoryResults,
    /// Versions whose result has no index file (computed before index
    /// files): ingest cannot count a change from them.
    pub without_index: std::collections::BTreeSet<u64>,
    pub now: DateTime<Utc>,
    pub slot_free: bool,
    pub source_tables: Option<Vec<String>>,
    pub cfg: PlannerConfig,
    /// Members an ingest loads for a version; `default_members` otherwise.
    pub members: BTreeMap<u64, Vec<String>>,
    pub default_members: Vec<String>,
    /// Every event of every applied plan, in order.
    pub events: Vec<Event>,
    /// Every `CollectResults` applied, with the time it was applied.
    pub collected: Vec<(DateTime<Utc>, Action)>,
    rt: tokio::runtime::Runtime,
}

impl World {
    pub fn new(spec_yaml: &str) -> World {
        World::with_segment(segment(spec_yaml))
    }

    pub fn with_segment(segment: Segment) -> World {
        World {
            segment,
            jobs: Vec::new(),
            store: MemoryStore::new(),
            results: MemoryResults::default(),
            without_index: Default::default(),
            now: t(CREATED),
            slot_free: true,
            source_tables: None,
            cfg: PlannerConfig::default(),
            members: BTreeMap::new(),
            default_members: users(&["u1", "u2", "u3"]),
            events: Vec::new(),
            collected: Vec::new(),
            rt: tokio::runtime::Builder::new_current_thread().build().expect("a tokio runtime"),
        }
    }

    pub fn status(&self) -> &SegmentStatus {
        self.segment.status.as_ref().expect("the Segment has a status")
    }

    pub fn run(&self) -> &RunStatus {
        self.status().current_run.as_ref().expect("a run is in flight")
    }

    /// What the adapters observe before planning: the store, and the
    /// verdict of an ingest that succeeded.
    pub fn store_view(&self) -> StoreView {
        let status = self.segment.status.as_ref();
        self.rt
            .block_on(async {
                let mut view = planner::observe_store(&self.store, &key(), status).await?;
                planner::observe_seal(&self.results, &key(), status, &self.jobs, &mut view).await?;
                Ok::<_, segment_core::store::StoreError>(view)
            })
            .expect("the store answers")
    }

    /// Plans on what the world looks like now, without applying anything.
    pub fn plan(&self) -> Plan {
        self.plan_with(&self.store_view())
    }

    pub fn plan_with(&self, view: &StoreView) -> Plan {
        let obs = Observation {
            segment: &self.segment,
            jobs: &self.jobs,
            store: view,
            source_tables: self.source_tables.as_deref(),
            compute_slot_free: self.slot_free,
            now: self.now,
            not_allowed: None,
        };
        planner::plan(&obs, &self.cfg)
    }

    /// Plans and applies the plan, as one reconcile of the operator.
    pub fn reconcile(&mut self) -> Plan {
        let plan = self.plan();
        self.apply(&plan);
        plan
    }

    /// Applies `plan` as the operator does, through the one executor.
    pub fn apply(&mut self, plan: &Plan) {
        self.apply_through(plan, Step::Events);
    }

    /// Applies only step 1 of a plan: the operator crashed right after it.
    pub fn apply_store_actions(&mut self, plan: &Plan) {
        self.apply_through(plan, Step::Store);
    }

    /// Applies the steps of `plan` up to `last`: the operator stopped there.
    pub fn apply_through(&mut self, plan: &Plan, last: Step) {
        let previous = self.segment.status.clone();
        let mut effects = WorldEffects {
            store: &self.store,
            jobs: &mut self.jobs,
            status: &mut self.segment.status,
            events: &mut self.events,
            collected: &mut self.collected,
            now: self.now,
        };
        let done = self.rt.block_on(executor::carry_out_through(plan, previous.as_ref(), &mut effects, last));
        if let Err(e) = done {
            panic!("{e}: {:?}", plan.actions);
        }
    }

    /// Reconciles until nothing more happens (the controller re-plans after
    /// every status write); returns every plan made.
    pub fn settle(&mut self) -> Vec<Plan> {
        let mut plans = Vec::new();
        for _ in 0..10 {
            let before = self.segment.status.clone();
            let plan = self.reconcile();
            let quiet = plan.actions.iter().all(|a| matches!(a, Action::Event(_) | Action::CollectResults { .. }));
            let unchanged = before.as_ref() == Some(&plan.status);
            plans.push(plan);
            if quiet && unchanged {
                return plans;
            }
        }
        panic!("the planner does not settle: {:#?}", plans.last());
    }

    pub fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    pub fn advance_to(&mut self, to: DateTime<Utc>) {
        assert!(to >= self.now, "time goes forward");
        self.now = to;
    }

    pub fn job(&self, version: u64, kind: JobKind) -> Option<&ObservedJob> {
        self.jobs.iter().find(|j| j.version == version && j.kind == kind)
    }

    pub fn job_mut(&mut self, version: u64, kind: JobKind) -> &mut ObservedJob {
        self.jobs
            .iter_mut()
            .find(|j| j.version == version && j.kind == kind)
            .unwrap_or_else(|| panic!("no {kind:?} Job for v{version}"))
    }

    /// The Job of `version` and `kind` succeeds now; an ingest writes its
    /// verdict first, as the worker does ([`World::verdict`]).
    pub fn succeed(&mut self, version: u64, kind: JobKind) {
        if kind == JobKind::Ingest {
            // Its members are fixed from now on, whatever later runs get.
            self.members.insert(version, self.members_of(version));
            let verdict = self.verdict(version);
            self.results.put_seal_file(&key(), version, verdict.to_bytes());
        }
        let now = self.now;
        self.job_mut(version, kind).state = JobState::Succeeded { finished_at: now };
    }

    /// The Job succeeds without writing a verdict.
    pub fn succeed_without_verdict(&mut self, version: u64, kind: JobKind) {
        let now = self.now;
        self.job_mut(version, kind).state = JobState::Succeeded { finished_at: now };
    }

    /// The members of `version`'s result.
    pub fn members_of(&self, version: u64) -> Vec<String> {
        self.members.get(&version).cloned().unwrap_or_else(|| self.default_members.clone())
    }

    /// What ingest concludes of `version` (the run in flight): its members'
    /// count, the run's snapshot time and definition hash, and the change
    /// from the version active now, counted when both results have index
    /// files.
    pub fn verdict(&self, version: u64) -> SealFile {
        let run = self.run();
        assert_eq!(run.version, version, "ingest runs for the run in flight");
        let members = self.members_of(version);
        let active = self.status().active_version.filter(|a| *a != version);
        let change = active.filter(|a| !self.without_index.contains(a) && !self.without_index.contains(&version)).map(|from| {
            let before: std::collections::BTreeSet<String> = self.members_of(from).into_iter().collect();
            let after: std::collections::BTreeSet<String> = members.iter().cloned().collect();
            CountedChange { from, changed: before.symmetric_difference(&after).count() as u64 }
        });
        let seal = Seal {
            members: members.len() as u64,
            snapshot_time: Some(run.snapshot_time),
            definition_hash: Some(run.definition_hash.clone()),
            change,
            overrides_from: Some(run.snapshot_time),
            table_versions: Vec::new(),
        };
        SealFile::new(key(), version, seal)
    }

    /// The seal in the verdict ingest wrote on `version`.
    pub fn verdict_on(&self, version: u64) -> Seal {
        let bytes = self.rt.block_on(segment_core::store::ResultStore::seal_file(&self.results, &key(), version));
        let bytes = bytes.expect("the results answer").unwrap_or_else(|| panic!("no verdict on v{version}"));
        serde_json::from_slice::<SealFile>(&bytes).expect("a seal file").seal
    }

    /// The `Seal` action that seals `version` from the verdict its ingest
    /// wrote.
    pub fn seal_action(&self, version: u64) -> Action {
        Action::Seal { version, seal: self.verdict_on(version) }
    }

    /// The ingest Job of the run in flight succeeds with the verdict
    /// [`World::verdict`] would write, changed by `edit`.
    pub fn succeed_with_verdict(&mut self, version: u64, edit: impl FnOnce(&mut Seal)) {
        self.members.insert(version, self.members_of(version));
        let mut verdict = self.verdict(version);
        edit(&mut verdict.seal);
        self.results.put_seal_file(&key(), version, verdict.to_bytes());
        self.succeed_without_verdict(version, JobKind::Ingest);
    }

    /// The member count the store records for `version`.
    pub fn stored_members(&self, version: u64) -> Option<u64> {
        self.rt.block_on(self.store.versions(&key())).expect("the store answers").get(&version).map(|v| v.members)
    }

    /// The Job fails with the worker's termination message.
    pub fn fail(&mut self, version: u64, kind: JobKind, termination_message: &str) {
        let failure = Failure::from_termination_message(termination_message).expect("a termination message");
        let now = self.now;
        self.job_mut(version, kind).state = JobState::Failed { finished_at: now, failure };
    }

    /// Puts `version` into the store, sealed, with its member count,
    /// snapshot time and definition hash (from the run in flight when it is
    /// that version), bypassing the verdict and the fence: a store written
    /// by something else (a late ingest of an older worker).
    pub fn load(&mut self, version: u64) {
        let members = self.members_of(version).len() as u64;
        let run = self.segment.status.as_ref().and_then(|s| s.current_run.as_ref()).filter(|r| r.version == version);
        let snapshot = run.map(|r| r.snapshot_time);
        let hash = run.map(|r| r.definition_hash.clone()).unwrap_or_else(|| definition_hash(&self.segment.spec.definition));
        self.store.load_version(&key(), version, members, snapshot, Some(hash));
    }

    /// Drives the run in flight through compute and ingest to the end,
    /// reconciling after each step; returns the plan of the last step.
    pub fn complete_run(&mut self) -> Plan {
        let version = self.run().version;
        self.settle();
        self.succeed(version, JobKind::Compute);
        self.reconcile();
        self.succeed(version, JobKind::Ingest);
        let plan = self.reconcile();
        self.settle();
        plan
    }

    /// Changes the spec; the API server bumps `metadata.generation`.
    pub fn edit(&mut self, change: impl FnOnce(&mut SegmentSpec)) {
        change(&mut self.segment.spec);
        self.segment.metadata.generation = Some(self.segment.metadata.generation.unwrap_or(0) + 1);
    }

    pub fn annotate(&mut self, key: &str, value: &str) {
        self.segment.metadata.annotations.get_or_insert_with(Default::default).insert(key.to_string(), value.to_string());
    }

    pub fn request_run(&mut self) {
        let value = self.now.to_rfc3339();
        self.annotate(RUN_REQUESTED_ANNOTATION, &value);
    }

    pub fn store_active(&self) -> Option<u64> {
        self.rt.block_on(self.store.active_version(&key())).expect("the store answers")
    }

    pub fn store_versions(&self) -> Vec<u64> {
        self.rt.block_on(self.store.versions(&key())).expect("the store answers").keys().copied().collect()
    }

    pub fn store_unsealed(&self) -> Vec<u64> {
        self.rt.block_on(self.store.unsealed_versions(&key())).expect("the store answers").into_iter().collect()
    }

    pub fn block_on<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(work)
    }

    pub fn wipe_store(&mut self) {
        self.rt.block_on(self.store.delete_segment(&key())).expect("the store answers");
    }

    pub fn compute_job_name(version: u64) -> String {
        job_name(NAME, version, JobKind::Compute)
    }
}

pub fn launches(plan: &Plan) -> Vec<&Launch> {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            Action::Launch(l) => Some(l),
            _ => None,
        })
        .collect()
}

pub fn events(plan: &Plan) -> Vec<&Event> {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            Action::Event(e) => Some(e),
            _ => None,
        })
        .collect()
}

/// Reasons of the plan's events, warnings marked with a leading `!`.
pub fn event_reasons(plan: &Plan) -> Vec<String> {
    events(plan).iter().map(|e| if e.is_warning() { format!("!{}", e.reason) } else { e.reason.to_string() }).collect()
}

/// The plan's actions other than Events and `CollectResults`.
pub fn effects(plan: &Plan) -> Vec<Action> {
    plan.actions.iter().filter(|a| !matches!(a, Action::Event(_) | Action::CollectResults { .. })).cloned().collect()
}

pub fn condition(status: &SegmentStatus, type_: ConditionType) -> &Condition {
    status.conditions.iter().find(|c| c.type_ == type_.as_str()).unwrap_or_else(|| panic!("no {type_} condition in {status:#?}"))
}

/// `(status, reason)` of a condition, for compact assertions.
pub fn cond(status: &SegmentStatus, type_: ConditionType) -> (String, String) {
    let c = condition(status, type_);
    (c.status.clone(), c.reason.clone())
}

pub fn is(status: &str, reason: &str) -> (String, String) {
    (status.to_string(), reason.to_string())
}

/// `(version, state)` of every entry in `status.versions`.
pub fn version_states(status: &SegmentStatus) -> Vec<(u64, VersionState)> {
    status.versions.iter().map(|v| (v.version, v.state)).collect()
}

pub fn version(status: &SegmentStatus, version: u64) -> &VersionStatus {
    status.versions.iter().find(|v| v.version == version).unwrap_or_else(|| panic!("no v{version} in {status:#?}"))
}

pub fn has_launch(plan: &Plan) -> bool {
    !launches(plan).is_empty()
}

/// Where the world's plans land: the in-memory store, the world's Jobs, its
/// Segment's status and its logs of Events and collections.
struct WorldEffects<'w> {
    store: &'w MemoryStore,
    jobs: &'w mut Vec<ObservedJob>,
    status: &'w mut Option<SegmentStatus>,
    events: &'w mut Vec<Event>,
    collected: &'w mut Vec<(DateTime<Utc>, Action)>,
    now: DateTime<Utc>,
}

#[async_trait::async_trait]
impl Effects for WorldEffects<'_> {
    type Error = String;

    async fn seal(&mut self, version: u64, seal: &Seal) -> Result<(), String> {
        let sealed = self.store.seal_with(&key(), version, seal).await;
        sealed.map(drop).map_err(|e| format!("Seal of v{version}: {e}"))
    }

    async fn activate(&mut self, version: u64) -> Result<(), String> {
        let activated = self.store.activate(&key(), version).await;
        activated.map_err(|e| format!("Activate of v{version}, which the store does not hold: {e}"))
    }

    async fn prune_overrides(&mut self, older_than: DateTime<Utc>) -> Result<(), String> {
        self.store.prune_overrides(&key(), older_than).await.map(drop).map_err(|e| e.to_string())
    }

    async fn delete_version(&mut self, version: u64) -> Result<(), String> {
        let active = self.store.active_version(&key()).await.map_err(|e| e.to_string())?;
        if active == Some(version) {
            return Err(format!("DeleteVersion of v{version}, the version readers see"));
        }
        self.store.delete_version(&key(), version).await.map_err(|e| e.to_string())
    }

    async fn collect_results(&mut self, older_than: DateTime<Utc>, keep: &[u64]) -> Result<(), String> {
        self.collected.push((self.now, Action::CollectResults { older_than, keep: keep.to_vec() }));
        Ok(())
    }

    async fn write_status(&mut self, status: &SegmentStatus) -> Result<(), String> {
        *self.status = Some(status.clone());
        Ok(())
    }

    async fn cancel_jobs(&mut self, version: u64) -> Result<(), String> {
        self.jobs.retain(|j| j.version != version);
        Ok(())
    }

    /// An existing name is `AlreadyExists` and left alone.
    async fn launch(&mut self, launch: &Launch) -> Result<(), String> {
        if !self.jobs.iter().any(|j| j.name == launch.job_name) {
            let mut job = ObservedJob::new(launch.job_name.clone(), launch.version, launch.kind, JobState::Running);
            job.created_at = Some(self.now);
            self.jobs.push(job);
        }
        Ok(())
    }

    async fn event(&mut self, event: &Event) {
        self.events.push(event.clone());
    }
}
