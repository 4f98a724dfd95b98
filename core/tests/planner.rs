//! The lifecycle planner driven end to end through a simulated world
//! (`common::World`): table tests for each part of the lifecycle, then
//! property tests over random sequences of events.

mod common;

use chrono::Duration;
use common::*;
use segment_core::api::*;
use segment_core::definition::definition_hash;
use segment_core::naming::JobKind::{Compute, Ingest};
use segment_core::planner::{Action, Event, Launch, PlannerConfig};
use segment_core::reasons::{FailureReason, HoldReason};
use segment_core::store::{CountedChange, Override, OverrideOp, SegmentStore};
use segment_core::task::Failure;
use ConditionType::{Ready as READY, Reconciling as RECONCILING, RolloverHeld as ROLLOVER_HELD, Stalled as STALLED};

const SQL: &str = "SELECT user_id FROM orders";

/// A spec with the standard SQL definition and `extra` spec YAML.
fn spec(extra: &str) -> String {
    format!("definition:\n  sql: {SQL}\n{extra}")
}

fn hourly(extra: &str) -> String {
    spec(&format!("schedule:\n  cron: \"0 * * * *\"\n{extra}"))
}

/// A world whose first version (v1) is computed, loaded and active.
fn world_with_v1(spec_yaml: &str) -> World {
    let mut w = World::new(spec_yaml);
    w.reconcile();
    w.complete_run();
    assert_eq!(w.status().active_version, Some(1));
    w
}

fn rerun(w: &mut World) -> u64 {
    w.request_run();
    w.reconcile();
    w.run().version
}

/// A manual run whose compute finished: its ingest Job is running.
fn rerun_to_ingesting(w: &mut World) -> u64 {
    let v = rerun(w);
    w.succeed(v, Compute);
    w.reconcile();
    v
}

// ---------------------------------------------------------------------------
// First run
// ---------------------------------------------------------------------------

#[test]
fn first_run_computes_then_ingests_then_activates_v1() {
    let mut w = World::new(&spec(""));
    let hash = definition_hash(&w.segment.spec.definition);

    let plan = w.reconcile();
    let compute = Launch {
        kind: Compute,
        version: 1,
        job_name: "vip-v1-compute".into(),
        snapshot_time: t(CREATED),
        definition_hash: hash.clone(),
        generation: 1,
    };
    assert_eq!(effects(&plan), vec![Action::Launch(compute)]);
    assert_eq!(event_reasons(&plan), ["RunStarted"]);
    let run = plan.status.current_run.as_ref().unwrap();
    assert_eq!((run.version, run.phase, run.trigger), (1, RunPhase::Computing, RunTrigger::Initial));
    assert_eq!(run.job.as_deref(), Some("vip-v1-compute"));
    assert_eq!((run.snapshot_time, run.started_at, run.generation), (t(CREATED), t(CREATED), 1));
    assert_eq!(plan.status.latest_version, 1);
    assert_eq!(plan.status.observed_generation, Some(1));
    assert_eq!(cond(&plan.status, READY), is("False", "Computing"));
    assert_eq!(cond(&plan.status, RECONCILING), is("True", "RunInProgress"));
    assert_eq!(cond(&plan.status, STALLED), is("False", "NotStalled"));
    assert_eq!(cond(&plan.status, ROLLOVER_HELD), is("False", "NotHeld"));
    assert_eq!(plan.requeue_at, Some(w.now + w.cfg.poll_interval));

    // Looking again while the Job runs changes nothing.
    let again = w.reconcile();
    assert!(again.actions.is_empty(), "{:?}", again.actions);
    assert_eq!(again.status, plan.status);

    w.advance(Duration::minutes(5));
    w.succeed(1, Compute);
    let plan = w.reconcile();
    let ingest = Launch {
        kind: Ingest,
        version: 1,
        job_name: ingest_job(1),
        snapshot_time: t(CREATED),
        definition_hash: hash.clone(),
        generation: 1,
    };
    assert_eq!(effects(&plan), vec![Action::Launch(ingest)]);
    let run = plan.status.current_run.as_ref().unwrap();
    assert_eq!((run.phase, run.job.as_deref()), (RunPhase::Ingesting, Some(ingest_job(1).as_str())));
    assert_eq!(run.computed_at, Some(t("2024-03-01T10:05:00Z")));
    assert_eq!(cond(&plan.status, READY), is("False", "Ingesting"));

    w.advance(Duration::minutes(2));
    w.succeed(1, Ingest);
    let plan = w.reconcile();
    // Sealed from the verdict ingest wrote, before anything else.
    assert_eq!(effects(&plan), vec![w.seal_action(1), Action::Activate { version: 1, previous: None }]);
    assert_eq!(event_reasons(&plan), ["VersionReady", "RolledOver"]);
    let st = &plan.status;
    assert_eq!(st.current_run, None);
    assert_eq!((st.active_version, st.members), (Some(1), Some(3)));
    assert_eq!(st.last_successful_time, Some(t("2024-03-01T10:07:00Z")));
    assert_eq!(version_states(st), [(1, VersionState::Active)]);
    let v1 = version(st, 1);
    assert_eq!((v1.members, v1.snapshot_time), (Some(3), t(CREATED)));
    assert_eq!((v1.computed_at, v1.ingested_at), (Some(t("2024-03-01T10:05:00Z")), Some(t("2024-03-01T10:07:00Z"))));
    assert_eq!(v1.definition_hash, hash);
    let ready = condition(st, READY);
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "VersionActive"));
    assert_eq!(ready.message, "v1 serves 3 members");
    assert_eq!(ready.last_transition_time, w.now, "Ready turned True now");
    assert_eq!(cond(st, RECONCILING), is("False", "NotReconciling"));
    assert_eq!(w.store_active(), Some(1));
    assert_eq!(w.stored_members(1), Some(3), "the verdict's count");

    // Nothing is left to do.
    let again = w.reconcile();
    assert!(effects(&again).is_empty(), "{:?}", again.actions);
    assert!(events(&again).is_empty());
}

#[test]
fn results_uri_is_recorded_under_the_configured_base() {
    let mut w = World::new(&spec(""));
    w.cfg.results_base = Some("s3://results/".into());
    w.reconcile();
    w.complete_run();
    assert_eq!(version(w.status(), 1).results_uri.as_deref(), Some("s3://results/growth/vip/v1/"));
}

// ---------------------------------------------------------------------------
// Schedule
// ---------------------------------------------------------------------------

#[test]
fn a_cron_run_starts_at_its_time_with_that_snapshot_time() {
    let mut w = world_with_v1(&spec("schedule:\n  cron: \"*/30 * * * *\"\n"));
    assert_eq!(w.status().next_schedule_time, Some(t("2024-03-01T10:30:00Z")));
    assert_eq!(w.status().last_schedule_time, None, "the initial run was not a scheduled one");

    w.advance_to(t("2024-03-01T10:29:59Z"));
    let plan = w.reconcile();
    assert!(!has_launch(&plan));
    assert_eq!(plan.requeue_at, Some(t("2024-03-01T10:30:00Z")), "wakes up for the schedule");

    w.advance_to(t("2024-03-01T10:30:07Z"));
    let plan = w.reconcile();
    let launched = launches(&plan);
    assert_eq!(launched.len(), 1);
    assert_eq!((launched[0].version, launched[0].snapshot_time), (2, t("2024-03-01T10:30:00Z")));
    let run = w.run();
    assert_eq!((run.trigger, run.snapshot_time, run.started_at), (RunTrigger::Schedule, t("2024-03-01T10:30:00Z"), w.now));
    assert_eq!(w.status().last_schedule_time, Some(t("2024-03-01T10:30:00Z")));
    assert_eq!(w.status().next_schedule_time, Some(t("2024-03-01T11:00:00Z")));
}

#[test]
fn macros_and_time_zones_set_the_next_schedule_time() {
    let cases = [
        ("@hourly", None, "2024-03-01T11:00:00Z"),
        ("@daily", None, "2024-03-02T00:00:00Z"),
        ("@weekly", None, "2024-03-03T00:00:00Z"),
        ("@monthly", None, "2024-04-01T00:00:00Z"),
        ("@daily", Some("Europe/Madrid"), "2024-03-01T23:00:00Z"),
        ("0 9 * * 1-5", Some("America/New_York"), "2024-03-01T14:00:00Z"),
    ];
    for (cron, zone, next) in cases {
        let zone = zone.map(|z| format!("  timeZone: {z}\n")).unwrap_or_default();
        let mut w = world_with_v1(&spec(&format!("schedule:\n  cron: \"{cron}\"\n{zone}")));
        assert_eq!(w.status().next_schedule_time, Some(t(next)), "{cron} {zone}");
        w.advance_to(t(next) + Duration::seconds(20));
        let plan = w.reconcile();
        let launched = launches(&plan);
        assert_eq!(launched.len(), 1, "{cron} {zone}");
        assert_eq!(launched[0].snapshot_time, t(next), "{cron} {zone}");
        assert_eq!(w.run().trigger, RunTrigger::Schedule);
    }
}

#[test]
fn only_the_latest_missed_run_starts_after_a_gap() {
    let mut w = world_with_v1(&hourly(""));
    w.advance_to(t("2024-03-01T15:20:00Z"));
    let plan = w.reconcile();
    let launched = launches(&plan);
    assert_eq!(launched.len(), 1, "one run for five missed times");
    assert_eq!((launched[0].version, launched[0].snapshot_time), (2, t("2024-03-01T15:00:00Z")));
    assert_eq!(w.status().last_schedule_time, Some(t("2024-03-01T15:00:00Z")));
    w.complete_run();
    w.advance_to(t("2024-03-01T15:59:59Z"));
    assert!(!has_launch(&w.reconcile()), "the missed times before 15:00 are not run afterwards");
    w.advance_to(t("2024-03-01T16:00:00Z"));
    assert_eq!(launches(&w.reconcile())[0].snapshot_time, t("2024-03-01T16:00:00Z"));
}

#[test]
fn starting_deadline_skips_a_late_run_once() {
    let mut w = world_with_v1(&hourly("  startingDeadlineSeconds: 300\n"));
    w.advance_to(t("2024-03-01T11:05:01Z"));
    let plan = w.reconcile();
    assert!(!has_launch(&plan));
    assert_eq!(event_reasons(&plan), ["!MissedSchedule"]);
    assert!(events(&plan)[0].message.contains("2024-03-01 11:00:00 UTC"), "{:?}", events(&plan));
    assert_eq!(plan.status.last_schedule_time, Some(t("2024-03-01T11:00:00Z")));
    assert_eq!(plan.status.next_schedule_time, Some(t("2024-03-01T12:00:00Z")));
    assert_eq!(plan.status.current_run, None);

    let again = w.reconcile();
    assert!(again.actions.is_empty(), "the skip is reported once: {:?}", again.actions);

    // Exactly at the deadline is still in time.
    w.advance_to(t("2024-03-01T12:05:00Z"));
    let plan = w.reconcile();
    assert_eq!(launches(&plan)[0].snapshot_time, t("2024-03-01T12:00:00Z"));
}

#[test]
fn suspend_stops_automatic_runs_but_a_manual_request_runs_once() {
    let mut w = World::new(&hourly("  suspend: true\n"));
    let plan = w.reconcile();
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(cond(&plan.status, READY), is("False", "Suspended"));
    assert_eq!(plan.status.next_schedule_time, None);
    assert_eq!(plan.requeue_at, None);

    w.advance(Duration::hours(3));
    assert!(!has_launch(&w.reconcile()));

    w.request_run();
    let requested = w.now.to_rfc3339();
    let plan = w.reconcile();
    assert_eq!(launches(&plan).len(), 1);
    assert_eq!((w.run().version, w.run().trigger, w.run().snapshot_time), (1, RunTrigger::Manual, w.now));
    assert_eq!(w.status().handled_run_request.as_deref(), Some(requested.as_str()));
    assert_eq!(w.status().last_schedule_time, None, "a manual run is not a scheduled one");
    w.complete_run();
    assert_eq!(w.status().active_version, Some(1));

    // The same annotation value is not a new request.
    w.advance(Duration::hours(2));
    assert!(!has_launch(&w.reconcile()));

    // A new definition waits for the schedule to be resumed (or a request).
    w.edit(|s| s.definition.sql = Some("SELECT user_id FROM users".into()));
    assert!(!has_launch(&w.reconcile()));
    w.request_run();
    let plan = w.reconcile();
    assert_eq!(launches(&plan)[0].version, 2);
    assert_eq!(w.run().trigger, RunTrigger::Manual, "the request is the trigger while suspended");
}

#[test]
fn a_manual_request_runs_at_once_and_only_once() {
    let mut w = world_with_v1(&spec(""));
    w.advance(Duration::minutes(10));
    w.request_run();
    let plan = w.reconcile();
    assert_eq!(launches(&plan).len(), 1);
    assert_eq!((w.run().version, w.run().trigger), (2, RunTrigger::Manual));
    w.complete_run();
    w.advance(Duration::days(1));
    assert!(!has_launch(&w.reconcile()));
    assert_eq!(w.status().latest_version, 2);
}

#[test]
fn a_schedule_without_creation_timestamp_still_runs() {
    let mut segment = segment(&hourly(""));
    segment.metadata.creation_timestamp = None;
    let mut w = World::with_segment(segment);
    w.reconcile();
    w.complete_run();
    w.advance_to(t("2024-03-01T11:00:30Z"));
    let plan = w.reconcile();
    assert_eq!(launches(&plan).len(), 1, "the 11:00 run starts");
    assert_eq!(w.run().snapshot_time, t("2024-03-01T11:00:00Z"));
}

// ---------------------------------------------------------------------------
// Concurrency policy
// ---------------------------------------------------------------------------

#[test]
fn forbid_waits_for_the_run_in_flight_then_starts_the_due_run() {
    let mut w = world_with_v1(&hourly(""));
    w.advance_to(t("2024-03-01T11:00:30Z"));
    w.reconcile();
    assert_eq!(w.run().version, 2);

    w.advance_to(t("2024-03-01T12:05:00Z"));
    let plan = w.reconcile();
    assert!(effects(&plan).is_empty(), "{:?}", plan.actions);
    assert_eq!(w.run().version, 2);
    assert_eq!(w.status().last_schedule_time, Some(t("2024-03-01T11:00:00Z")), "12:00 is still owed");

    w.advance_to(t("2024-03-01T12:10:00Z"));
    w.succeed(2, Compute);
    w.reconcile();
    w.succeed(2, Ingest);
    let plan = w.reconcile();
    assert!(plan.actions.contains(&Action::Activate { version: 2, previous: Some(1) }));
    let launched = launches(&plan);
    assert_eq!(launched.len(), 1);
    assert_eq!((launched[0].version, launched[0].kind, launched[0].snapshot_time), (3, Compute, t("2024-03-01T12:00:00Z")));
    assert_eq!(w.run().trigger, RunTrigger::Schedule);
    assert_eq!(w.status().last_schedule_time, Some(t("2024-03-01T12:00:00Z")));
}

#[test]
fn replace_cancels_the_run_in_flight_and_starts_the_due_run() {
    let mut w = world_with_v1(&hourly("  concurrencyPolicy: Replace\n"));
    w.advance_to(t("2024-03-01T11:00:00Z"));
    w.reconcile();
    w.succeed(2, Compute);
    w.reconcile();
    assert_eq!(w.run().phase, RunPhase::Ingesting);

    w.advance_to(t("2024-03-01T12:00:10Z"));
    let plan = w.reconcile();
    let new_compute = Launch {
        kind: Compute,
        version: 3,
        job_name: "vip-v3-compute".into(),
        snapshot_time: t("2024-03-01T12:00:00Z"),
        definition_hash: definition_hash(&w.segment.spec.definition),
        generation: 1,
    };
    assert_eq!(
        effects(&plan),
        vec![Action::CancelJobs { version: 2 }, Action::DeleteVersion { version: 2 }, Action::Launch(new_compute)]
    );
    assert_eq!(event_reasons(&plan), ["RunCancelled", "RunStarted"]);
    let v2 = version(&plan.status, 2);
    assert_eq!((v2.state, v2.reason.as_deref()), (VersionState::Failed, Some("Replaced")));
    assert_eq!(cond(&plan.status, READY), is("True", "VersionActive"), "a replaced run is not a failure");
    assert_eq!(plan.status.active_version, Some(1));
    assert!(w.job(2, Compute).is_none() && w.job(2, Ingest).is_none(), "the Jobs of v2 are gone");

    // A run still computing is cancelled without a store deletion.
    w.advance_to(t("2024-03-01T13:00:00Z"));
    let plan = w.reconcile();
    assert_eq!(effects(&plan)[..2], [Action::CancelJobs { version: 3 }, Action::Launch(launches(&plan)[0].clone())]);
    assert_eq!(launches(&plan)[0].version, 4);
    assert!(!plan.actions.iter().any(|a| matches!(a, Action::DeleteVersion { .. })));
}

#[test]
fn replace_does_not_launch_the_next_job_of_the_run_it_cancels() {
    let mut w = world_with_v1(&hourly("  concurrencyPolicy: Replace\n"));
    w.advance_to(t("2024-03-01T11:00:00Z"));
    w.reconcile();
    // The compute Job of v2 finishes just as the next run comes due.
    w.advance_to(t("2024-03-01T12:00:10Z"));
    w.succeed(2, Compute);
    let plan = w.reconcile();
    let launched: Vec<(u64, _)> = launches(&plan).iter().map(|l| (l.version, l.kind)).collect();
    assert_eq!(launched, [(3, Compute)], "no ingest Job for the cancelled v2");
    assert!(plan.actions.contains(&Action::CancelJobs { version: 2 }));
    assert!(w.job(2, Ingest).is_none());
}

// ---------------------------------------------------------------------------
// Definition and schedule changes
// ---------------------------------------------------------------------------

#[test]
fn a_definition_change_supersedes_the_run_in_flight() {
    let mut w = world_with_v1(&hourly(""));
    w.advance_to(t("2024-03-01T11:00:00Z"));
    w.reconcile();
    w.advance(Duration::minutes(3));
    w.edit(|s| s.definition.sql = Some("SELECT user_id FROM users".into()));
    let new_hash = definition_hash(&w.segment.spec.definition);
    let plan = w.reconcile();
    let launch = Launch {
        kind: Compute,
        version: 3,
        job_name: "vip-v3-compute".into(),
        snapshot_time: w.now,
        definition_hash: new_hash.clone(),
        generation: 2,
    };
    assert_eq!(effects(&plan), vec![Action::CancelJobs { version: 2 }, Action::Launch(launch)]);
    assert_eq!(event_reasons(&plan), ["RunCancelled", "RunStarted"]);
    let v2 = version(&plan.status, 2);
    assert_eq!((v2.state, v2.reason.as_deref()), (VersionState::Failed, Some("Superseded")));
    assert_eq!((w.run().trigger, w.run().generation), (RunTrigger::Definition, 2));
    assert_eq!(cond(&plan.status, READY), is("True", "VersionActive"));
    assert_eq!(cond(&plan.status, RECONCILING), is("True", "RunInProgress"), "the new definition has no version yet");
    assert_eq!(plan.status.observed_generation, Some(2));

    w.complete_run();
    assert_eq!(version(w.status(), 3).definition_hash, new_hash);
    assert_eq!(cond(w.status(), RECONCILING), is("False", "NotReconciling"));
}

#[test]
fn a_definition_change_starts_a_run_at_once() {
    let mut w = world_with_v1(&hourly(""));
    w.advance(Duration::minutes(7));
    w.edit(|s| s.definition.sql = Some("SELECT user_id FROM users".into()));
    let plan = w.reconcile();
    assert_eq!(launches(&plan).len(), 1);
    assert_eq!((w.run().version, w.run().trigger, w.run().snapshot_time), (2, RunTrigger::Definition, w.now));
}

#[test]
fn a_schedule_change_only_replans() {
    let mut w = world_with_v1(&hourly(""));
    w.advance(Duration::minutes(7));
    w.edit(|s| s.schedule.as_mut().unwrap().cron = "45 * * * *".into());
    let plan = w.reconcile();
    assert!(effects(&plan).is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.status.next_schedule_time, Some(t("2024-03-01T10:45:00Z")));
    assert_eq!(plan.status.observed_generation, Some(2));
    w.edit(|s| s.rollover.min_members = 1);
    w.edit(|s| s.retention.keep_versions = 5);
    assert!(effects(&w.reconcile()).is_empty());
}

// ---------------------------------------------------------------------------
// Invalid specs
// ---------------------------------------------------------------------------

struct Invalid {
    spec: String,
    source_tables: Option<Vec<String>>,
    reason: &'static str,
    message: &'static str,
}

fn invalid_cases() -> Vec<Invalid> {
    vec![
        Invalid {
            spec: "definition:\n  sql: SELEC user_id FROM orders\n".into(),
            source_tables: None,
            reason: "InvalidDefinition",
            message: "spec.definition.sql: does not parse:",
        },
        Invalid {
            spec: format!("definition:\n  sql: {SQL}\n  static:\n    uri: s3://uploads/vip.csv\n"),
            source_tables: None,
            reason: "InvalidDefinition",
            message: "spec.definition: must set exactly one of sql, rules or static",
        },
        Invalid {
            spec: spec(""),
            source_tables: Some(vec!["users".into()]),
            reason: "InvalidDefinition",
            message: "spec.definition.sql: unknown table `orders`: no SegmentSource in this namespace declares it (known: users)",
        },
        Invalid {
            spec: spec("schedule:\n  cron: \"0 0 * * * *\"\n"),
            source_tables: None,
            reason: "InvalidSchedule",
            message: "spec.schedule.cron: `0 0 * * * *` has 6 fields",
        },
        Invalid {
            spec: spec("schedule:\n  cron: \"0 * * * *\"\n  timeZone: Mars/Olympus\n"),
            source_tables: None,
            reason: "InvalidSchedule",
            message: "spec.schedule.timeZone: `Mars/Olympus` is not an IANA time zone",
        },
        Invalid {
            spec: spec("schedule:\n  cron: \"61 * * * *\"\n"),
            source_tables: None,
            reason: "InvalidSchedule",
            message: "spec.schedule.cron: `61 * * * *` is not a valid cron",
        },
        // Rejected by the CRD's rules in a cluster, but not in standalone mode.
        Invalid {
            spec: spec("retention:\n  keepResultsFor: 7y\n"),
            source_tables: None,
            reason: "InvalidSpec",
            message: "spec.retention.keepResultsFor: `7y` has unit `y`",
        },
        Invalid {
            spec: spec("rollover:\n  maxChangeRatio: 1.5\n"),
            source_tables: None,
            reason: "InvalidSpec",
            message: "spec.rollover.maxChangeRatio: must be between 0 and 1, got 1.5",
        },
    ]
}

#[test]
fn an_invalid_spec_launches_nothing_and_warns_once() {
    for case in invalid_cases() {
        let mut w = World::new(&case.spec);
        w.source_tables = case.source_tables.clone();
        let plan = w.reconcile();
        let ctx = case.message;
        assert!(effects(&plan).is_empty(), "{ctx}: {:?}", plan.actions);
        assert_eq!(plan.status.current_run, None, "{ctx}");
        assert_eq!(plan.status.latest_version, 0, "{ctx}");
        let ready = condition(&plan.status, READY);
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", case.reason), "{ctx}");
        assert!(ready.message.starts_with(case.message), "{ctx}: {}", ready.message);
        assert!(ready.message.ends_with("; nothing is launched"), "{}", ready.message);
        assert_eq!(cond(&plan.status, STALLED), is("True", case.reason), "{ctx}");
        assert_eq!(cond(&plan.status, RECONCILING), is("False", "NotReconciling"), "{ctx}");
        assert_eq!(plan.status.next_schedule_time, None, "{ctx}");
        let evs = events(&plan);
        assert_eq!(evs.len(), 1, "{ctx}: {evs:?}");
        assert!(
            evs[0].is_warning() && evs[0].reason.as_str() == case.reason && evs[0].message == ready.message,
            "{ctx}: {evs:?}"
        );

        w.advance(Duration::minutes(1));
        let again = w.reconcile();
        assert!(again.actions.is_empty(), "{ctx}: no second event: {:?}", again.actions);
        assert_eq!(condition(&again.status, READY).last_transition_time, t(CREATED), "{ctx}");
    }
}

#[test]
fn an_invalid_spec_keeps_the_active_version_serving() {
    for case in invalid_cases() {
        let ctx = case.message;
        let mut w = world_with_v1(&hourly(""));
        w.advance(Duration::minutes(5));
        let valid_schedule = w.segment.spec.schedule.clone();
        let broken = segment(&case.spec).spec;
        w.edit(|s| {
            *s = SegmentSpec { schedule: broken.schedule.clone().or(valid_schedule), ..broken };
        });
        w.source_tables = case.source_tables.clone();
        let plan = w.reconcile();
        assert!(effects(&plan).is_empty(), "{ctx}: {:?}", plan.actions);
        assert_eq!((plan.status.active_version, plan.status.members), (Some(1), Some(3)), "{ctx}");
        assert_eq!(version_states(&plan.status), [(1, VersionState::Active)], "{ctx}");
        let ready = condition(&plan.status, READY);
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", case.reason), "{ctx}");
        assert!(ready.message.ends_with("; nothing is launched and v1 serves 3 members"), "{ctx}: {}", ready.message);
        assert_eq!(w.store_active(), Some(1));

        // Scheduled times pass without runs.
        w.advance(Duration::hours(2));
        let later = w.reconcile();
        assert!(effects(&later).is_empty(), "{ctx}: {:?}", later.actions);
    }
}

#[test]
fn an_invalid_definition_cancels_the_run_of_the_old_one_and_starts_nothing() {
    let mut w = world_with_v1(&hourly(""));
    w.advance_to(t("2024-03-01T11:00:00Z"));
    w.reconcile();
    w.succeed(2, Compute);
    w.reconcile();
    w.edit(|s| s.definition.sql = Some("SELEC user_id".into()));
    let plan = w.reconcile();
    assert_eq!(effects(&plan), vec![Action::CancelJobs { version: 2 }, Action::DeleteVersion { version: 2 }]);
    assert_eq!(plan.status.current_run, None);
    assert_eq!(plan.status.active_version, Some(1));
}

#[test]
fn an_invalid_schedule_freezes_the_run_in_flight_until_fixed() {
    let mut w = world_with_v1(&hourly(""));
    w.advance_to(t("2024-03-01T11:00:00Z"));
    w.reconcile();
    w.edit(|s| s.schedule.as_mut().unwrap().cron = "0 * * *".into());
    w.succeed(2, Compute);
    let plan = w.reconcile();
    assert!(!has_launch(&plan), "nothing is launched while the spec is invalid: {:?}", plan.actions);
    assert_eq!(cond(&plan.status, READY), is("False", "InvalidSchedule"));
    assert_eq!(w.run().version, 2, "the run is kept, not lost");

    w.edit(|s| s.schedule.as_mut().unwrap().cron = "0 * * * *".into());
    let plan = w.reconcile();
    let launched: Vec<(u64, _)> = launches(&plan).iter().map(|l| (l.version, l.kind)).collect();
    assert_eq!(launched, [(2, Ingest)]);
    assert_eq!(w.run().phase, RunPhase::Ingesting);
}

#[test]
fn a_pending_run_is_not_launched_while_the_spec_is_invalid() {
    let mut w = World::new(&hourly(""));
    w.slot_free = false;
    w.reconcile();
    assert_eq!(w.run().phase, RunPhase::Pending);
    w.source_tables = Some(vec!["users".into()]);
    w.slot_free = true;
    let plan = w.reconcile();
    assert!(!has_launch(&plan), "{:?}", plan.actions);
    assert_eq!(cond(&plan.status, READY), is("False", "InvalidDefinition"));
    w.source_tables = Some(vec!["orders".into()]);
    let plan = w.reconcile();
    assert_eq!(launches(&plan).iter().map(|l| l.version).collect::<Vec<_>>(), [1]);
}

// ---------------------------------------------------------------------------
// Failures and retries
// ---------------------------------------------------------------------------

#[test]
fn a_permanent_compute_failure_keeps_the_previous_version_serving() {
    let mut w = world_with_v1(&spec(""));
    w.advance(Duration::minutes(1));
    let v = rerun(&mut w);
    w.fail(v, Compute, "UnknownTable: table `x` is not declared\n");
    let plan = w.reconcile();
    assert!(effects(&plan).is_empty(), "{:?}", plan.actions);
    assert_eq!(event_reasons(&plan), ["!RunFailed"]);
    assert_eq!(events(&plan)[0].message, "v2 compute failed: UnknownTable: table `x` is not declared; v1 keeps serving");
    let st = &plan.status;
    assert_eq!(version_states(st), [(2, VersionState::Failed), (1, VersionState::Active)]);
    let v2 = version(st, 2);
    assert_eq!((v2.reason.as_deref(), v2.message.as_deref()), (Some("UnknownTable"), Some("table `x` is not declared")));
    assert_eq!((st.retry_at, st.consecutive_failures, st.current_run.as_ref()), (None, 1, None));
    let ready = condition(st, READY);
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "LastRunFailed"));
    assert_eq!(ready.message, "v1 serves 3 members; v2 failed: UnknownTable: table `x` is not declared");
    assert_eq!(cond(st, STALLED), is("False", "NotStalled"), "the definition has a serving version");
    assert_eq!(w.store_active(), Some(1));

    w.advance(Duration::days(1));
    assert!(!has_launch(&w.reconcile()), "a permanent failure is not retried");
}

#[test]
fn a_permanent_failure_of_the_first_run_stalls() {
    let mut w = World::new(&spec(""));
    w.reconcile();
    w.fail(1, Compute, "QueryError: column `user_id` not found");
    let plan = w.reconcile();
    assert_eq!(cond(&plan.status, READY), is("False", "RunFailed"));
    assert_eq!(condition(&plan.status, READY).message, "v1 failed: QueryError: column `user_id` not found");
    assert_eq!(cond(&plan.status, STALLED), is("True", "RunFailed"));
    assert_eq!(cond(&plan.status, RECONCILING), is("False", "NotReconciling"));
    assert_eq!(plan.status.retry_at, None);
    assert_eq!(events(&plan)[0].message, "v1 compute failed: QueryError: column `user_id` not found; no version is served yet");
    w.advance(Duration::days(2));
    assert!(effects(&w.reconcile()).is_empty());
}

#[test]
fn a_definition_change_after_a_permanent_failure_runs_again() {
    let mut w = World::new(&spec(""));
    w.reconcile();
    w.fail(1, Compute, "UnknownColumn: no column `user_id`");
    w.reconcile();
    w.edit(|s| s.definition.sql = Some("SELECT id AS user_id FROM orders".into()));
    let plan = w.reconcile();
    assert_eq!(launches(&plan).len(), 1);
    assert_eq!((w.run().version, w.run().trigger), (2, RunTrigger::Definition));
    assert_eq!(cond(&plan.status, STALLED), is("False", "NotStalled"));
}

#[test]
fn transient_failures_are_retried_with_backoff_up_to_max_retries() {
    let mut w = World::new(&spec(""));
    w.cfg = PlannerConfig {
        retry_base: Duration::seconds(30),
        retry_max: Duration::seconds(100),
        max_retries: 3,
        ..PlannerConfig::default()
    };
    w.reconcile();
    let mut expected_delays = vec![30, 60, 100].into_iter();
    for attempt in 1..=4u64 {
        assert_eq!(w.run().version, attempt);
        w.advance(Duration::minutes(1));
        w.fail(attempt, Compute, "UnreadableSource: s3://lake/orders/: connection reset");
        let plan = w.reconcile();
        assert_eq!(plan.status.consecutive_failures, attempt as u32);
        let Some(delay) = expected_delays.next() else {
            // The fourth failure is past max_retries: wait for a schedule or a request.
            assert_eq!(plan.status.retry_at, None);
            assert_eq!(cond(&plan.status, STALLED), is("True", "RunFailed"));
            let next_collection = plan.status.results_collected_at.map(|at| at + w.cfg.results_collect_interval);
            assert_eq!(plan.requeue_at, next_collection, "no wake-up for a retry");
            break;
        };
        let retry_at = w.now + Duration::seconds(delay);
        assert_eq!(plan.status.retry_at, Some(retry_at), "attempt {attempt}");
        assert_eq!(plan.requeue_at, Some(retry_at));
        assert_eq!(cond(&plan.status, READY), is("False", "RunFailed"));
        assert_eq!(cond(&plan.status, STALLED), is("False", "NotStalled"), "a retry is planned");

        w.advance_to(retry_at - Duration::seconds(1));
        assert!(!has_launch(&w.reconcile()), "not before retry_at");
        w.advance_to(retry_at);
        let plan = w.reconcile();
        assert_eq!(launches(&plan).len(), 1);
        assert_eq!(w.run().trigger, RunTrigger::Retry);
        assert_eq!(w.status().retry_at, None);
    }
    w.advance(Duration::days(1));
    assert!(!has_launch(&w.reconcile()));

    // A success resets the count.
    w.request_run();
    w.reconcile();
    w.complete_run();
    assert_eq!((w.status().consecutive_failures, w.status().retry_at), (0, None));
}

#[test]
fn an_ingest_failure_deletes_the_partial_version_and_keeps_the_previous() {
    let mut w = world_with_v1(&spec(""));
    w.advance(Duration::minutes(1));
    let v = rerun_to_ingesting(&mut w);
    w.fail(v, Ingest, "StoreUnavailable: connection refused");
    let plan = w.reconcile();
    assert_eq!(effects(&plan), vec![Action::DeleteVersion { version: 2 }]);
    assert_eq!(version_states(&plan.status), [(2, VersionState::Failed), (1, VersionState::Active)]);
    assert_eq!(version(&plan.status, 2).reason.as_deref(), Some("StoreUnavailable"));
    assert!(plan.status.retry_at.is_some(), "a store outage is transient");
    assert_eq!(cond(&plan.status, READY), is("True", "LastRunFailed"));
    assert_eq!(w.store_active(), Some(1));
}

/// Ingest writes its verdict and touches no store; the plan after its Job
/// succeeded seals the version from the verdict, as the verdict says
/// (members, change, times), before any other store action.
#[test]
fn a_successful_ingest_is_sealed_from_its_verdict() {
    let mut w = world_with_v1(&spec(""));
    w.members.insert(2, users(&["u2", "u3", "u4", "u5"]));
    w.advance(Duration::minutes(1));
    let v = rerun_to_ingesting(&mut w);
    w.succeed(v, Ingest);
    assert_eq!(w.store_versions(), [1], "the ingest Job sealed nothing");
    let plan = w.reconcile();
    let verdict = w.verdict_on(v);
    assert_eq!(plan.actions.first(), Some(&Action::Seal { version: v, seal: verdict.clone() }), "{:?}", plan.actions);
    assert_eq!(effects(&plan), vec![w.seal_action(v), Action::Activate { version: v, previous: Some(1) }]);
    let stored = w.block_on(w.store.versions(&key())).unwrap()[&v].clone();
    assert_eq!(stored, verdict.stored(true), "recorded as the verdict says, and promoted by the switch");
    assert_eq!((stored.members, stored.change.map(|c| (c.from, c.changed))), (4, Some((1, 3))));
    assert_eq!(plan.status.members, Some(4));
}

/// A successful ingest Job that left no verdict fails its run, once, with
/// a typed reason; nothing is sealed, the previous version keeps serving,
/// and the failure is retried like any transient one.
#[test]
fn an_ingest_that_leaves_no_verdict_fails_the_run_as_incomplete() {
    let mut w = world_with_v1(&spec(""));
    w.advance(Duration::minutes(1));
    let v = rerun_to_ingesting(&mut w);
    w.succeed_without_verdict(v, Ingest);
    let plan = w.reconcile();
    assert_eq!(effects(&plan), vec![Action::DeleteVersion { version: 2 }]);
    let failed = version(&plan.status, 2);
    assert_eq!(failed.reason.as_deref(), Some("IngestIncomplete"));
    assert_eq!(failed.message.as_deref(), Some("the ingest Job succeeded but left no verdict (_seal.json) on v2"));
    assert!(plan.status.retry_at.is_some());
    assert_eq!(plan.status.active_version, Some(1));
    assert_eq!(w.store_versions(), [1]);
    assert!(effects(&w.reconcile()).is_empty(), "failed once, not again");
}

/// A seal file that is not this run's verdict (damaged, forged, another
/// version's, another definition's) seals nothing: the run fails with the
/// reason, and its leftovers are deleted.
#[test]
fn a_verdict_that_is_not_the_runs_fails_the_run_and_seals_nothing() {
    use segment_core::seal::SealFile;
    type Forge = Box<dyn Fn(&mut SealFile) -> Vec<u8>>;
    let cases: [(&str, Forge); 4] = [
        ("does not parse", Box::new(|_| b"{\"members\": 999999".to_vec())),
        ("the verdict on growth/vip v7", Box::new(|f| SealFile { version: 7, ..f.clone() }.to_bytes())),
        (
            "definition hash forged",
            Box::new(|f| {
                f.seal.definition_hash = Some("forged".into());
                f.to_bytes()
            }),
        ),
        (
            "snapshot time",
            Box::new(|f| {
                f.seal.snapshot_time = f.seal.snapshot_time.map(|t| t - Duration::days(1));
                f.to_bytes()
            }),
        ),
    ];
    for (expected, forge) in cases {
        let mut w = world_with_v1(&spec(""));
        w.advance(Duration::minutes(1));
        let v = rerun_to_ingesting(&mut w);
        let mut verdict = w.verdict(v);
        verdict.seal.members = 999_999;
        w.results.put_seal_file(&key(), v, forge(&mut verdict));
        w.succeed_without_verdict(v, Ingest);
        let plan = w.reconcile();
        assert!(!plan.actions.iter().any(|a| matches!(a, Action::Seal { .. })), "{expected}: {:?}", plan.actions);
        assert_eq!(effects(&plan), vec![Action::DeleteVersion { version: v }], "{expected}");
        let failed = version(&plan.status, v);
        assert_eq!(failed.reason.as_deref(), Some("IngestIncomplete"), "{expected}");
        let message = failed.message.clone().unwrap_or_default();
        assert!(message.starts_with("the ingest Job's verdict on v2 is not sound: _seal.json"), "{message}");
        assert!(message.contains(expected), "{expected}: {message}");
        assert_eq!(w.store_versions(), [1], "{expected}");
        assert_eq!(plan.status.active_version, Some(1));
        assert!(effects(&w.reconcile()).is_empty(), "{expected}: failed once");
    }
}

/// A version deleted (fenced) while it was ingested is never sealed from
/// its verdict, even though the verdict is sound: the run fails with a
/// typed reason instead of trying to seal again on every look. (The plan
/// that fenced it failed to record the run's end: a status write lost.)
#[test]
fn a_fenced_version_is_not_sealed_and_its_run_fails() {
    let mut w = world_with_v1(&spec(""));
    w.advance(Duration::minutes(1));
    let v = rerun_to_ingesting(&mut w);
    w.block_on(w.store.delete_version(&key(), v)).unwrap();
    w.succeed(v, Ingest);
    let view = w.store_view();
    assert!(view.fenced.contains(&v) && view.verdict.is_none(), "the verdict is not even read: {view:?}");
    let plan = w.reconcile();
    assert!(!plan.actions.iter().any(|a| matches!(a, Action::Seal { .. })), "{:?}", plan.actions);
    let failed = version(&plan.status, v);
    assert_eq!(failed.reason.as_deref(), Some("IngestIncomplete"));
    assert_eq!(failed.message.as_deref(), Some("v2 was deleted while it was ingested and cannot be sealed"));
    assert_eq!(w.store_versions(), [1]);
    assert!(effects(&w.reconcile()).is_empty(), "no second attempt");

    // The store refuses to seal it whoever asks: the plan that tries (a
    // stale one) fails before anything else of it happens.
    let refused = w.block_on(w.store.seal_with(&key(), v, &w.verdict_on(v)));
    assert!(matches!(refused, Err(segment_core::store::StoreError::Fenced { .. })), "{refused:?}");
}

#[test]
fn a_past_retry_that_cannot_start_does_not_requeue_in_a_loop() {
    let mut w = World::new(&hourly(""));
    w.reconcile();
    w.fail(1, Compute, "UnreadableSource: timeout");
    w.reconcile();
    w.edit(|s| s.schedule.as_mut().unwrap().suspend = true);
    w.advance(Duration::minutes(5));
    let plan = w.reconcile();
    assert!(!has_launch(&plan));
    assert!(plan.requeue_at.is_none_or(|at| at > w.now), "requeue_at {:?} <= now {}", plan.requeue_at, w.now);
    w.edit(|s| s.schedule.as_mut().unwrap().suspend = false);
    let plan = w.reconcile();
    assert_eq!(w.run().trigger, RunTrigger::Retry, "{:?}", plan.actions);
}

// ---------------------------------------------------------------------------
// Rollover guard
// ---------------------------------------------------------------------------

#[test]
fn min_members_holds_a_version_until_it_is_approved() {
    let mut w = World::new(&spec("rollover:\n  minMembers: 5\n"));
    w.reconcile();
    w.succeed(1, Compute);
    w.reconcile();
    w.succeed(1, Ingest);
    let plan = w.reconcile();
    assert_eq!(effects(&plan), vec![w.seal_action(1)], "sealed, not activated");
    assert_eq!(event_reasons(&plan), ["!RolloverHeld"]);
    assert_eq!(
        events(&plan)[0].message,
        "v1 has 3 members, fewer than minMembers 5; approve with the annotation segmentation.dev/approve-version=\"1\""
    );
    let run = plan.status.current_run.as_ref().unwrap();
    assert_eq!(
        (run.phase, run.reason.as_deref(), run.job.as_deref()),
        (RunPhase::AwaitingApproval, Some("BelowMinMembers"), None)
    );
    assert_eq!(cond(&plan.status, ROLLOVER_HELD), is("True", "BelowMinMembers"));
    assert_eq!(cond(&plan.status, READY), is("False", "AwaitingApproval"));
    assert_eq!(plan.status.active_version, None);

    let again = w.reconcile();
    assert!(again.actions.is_empty(), "held once, reported once: {:?}", again.actions);

    w.annotate(APPROVE_VERSION_ANNOTATION, "2");
    let plan = w.reconcile();
    assert!(plan.actions.is_empty(), "approving another version does nothing: {:?}", plan.actions);

    w.annotate(APPROVE_VERSION_ANNOTATION, "1");
    let plan = w.reconcile();
    assert_eq!(effects(&plan), vec![Action::Activate { version: 1, previous: None }]);
    assert_eq!(event_reasons(&plan), ["VersionReady", "RolledOver"]);
    assert!(events(&plan)[0].message.ends_with("(approved)"));
    assert_eq!(cond(&plan.status, ROLLOVER_HELD), is("False", "NotHeld"));
    assert_eq!(cond(&plan.status, READY), is("True", "VersionActive"));
}

#[test]
fn max_change_ratio_holds_or_promotes_by_the_change_ingest_counted() {
    let mut w = World::new(&spec("rollover:\n  maxChangeRatio: 0.5\n"));
    w.default_members = users(&["a", "b", "c", "d"]);
    w.reconcile();
    w.complete_run();
    assert_eq!(w.status().active_version, Some(1), "nothing to compare the first version with");

    // v2 changes 5 of v1's 4 members: a, b out; e, f, g in.
    w.members.insert(2, users(&["c", "d", "e", "f", "g"]));
    w.advance(Duration::minutes(1));
    let v = rerun_to_ingesting(&mut w);
    w.succeed(v, Ingest);
    assert_eq!(w.verdict_on(v).change, Some(CountedChange { from: 1, changed: 5 }), "counted by ingest");

    let plan = w.reconcile();
    assert_eq!(effects(&plan), vec![w.seal_action(v)], "sealed, not activated");
    assert_eq!(event_reasons(&plan), ["!RolloverHeld"]);
    let run = plan.status.current_run.as_ref().unwrap();
    assert_eq!((run.phase, run.reason.as_deref()), (RunPhase::AwaitingApproval, Some("ChangeRatioExceeded")));
    assert_eq!(run.message.as_deref(), Some("v2 changes 5 members, 125.0% of v1's 4 (maxChangeRatio 0.5)"));
    assert_eq!(cond(&plan.status, ROLLOVER_HELD), is("True", "ChangeRatioExceeded"));
    assert_eq!(cond(&plan.status, READY), is("True", "VersionActive"), "v1 keeps serving");
    assert!(w.reconcile().actions.is_empty());

    w.annotate(APPROVE_VERSION_ANNOTATION, " 2 ");
    let plan = w.reconcile();
    assert_eq!(effects(&plan), vec![Action::Activate { version: 2, previous: Some(1) }]);
    assert_eq!(w.stored_members(2), Some(5));

    // A small change passes without approval: 1 of 5.
    w.members.insert(3, users(&["c", "d", "e", "f", "g", "h"]));
    w.advance(Duration::minutes(1));
    rerun(&mut w);
    let plan = w.complete_run();
    assert_eq!(effects(&plan), vec![w.seal_action(3), Action::Activate { version: 3, previous: Some(2) }]);
}

/// The guard compares with the active version by the change ingest
/// counted from the two versions' index files, recorded with the version:
/// that count decides, whatever else differs. A change that could not be
/// counted against the active version (it has no index file, or readers
/// were switched since the run started) holds the version for approval,
/// with a typed reason: the store holds no member sets to count it.
#[test]
fn the_guard_uses_the_change_ingest_counted_and_holds_a_version_whose_change_was_not_counted() {
    let world = || {
        let mut w = World::new(&spec("rollover:\n  maxChangeRatio: 0.5\n"));
        w.default_members = users(&["a", "b", "c", "d"]);
        w.reconcile();
        w.complete_run();
        w.members.insert(2, users(&["c", "d", "e", "f", "g"]));
        w.advance(Duration::minutes(1));
        let v = rerun_to_ingesting(&mut w);
        (w, v)
    };

    // Ingest's count is the one used: 1 of 4 passes.
    let (mut w, v) = world();
    w.succeed_with_verdict(v, |seal| seal.change = Some(CountedChange { from: 1, changed: 1 }));
    let plan = w.reconcile();
    assert!(plan.actions.contains(&Action::Activate { version: v, previous: Some(1) }), "{:?}", plan.actions);

    // v1's files could not be read at ingest: nothing was counted.
    let (mut w, v) = world();
    w.without_index.insert(1);
    w.succeed(v, Ingest);
    assert_eq!(w.verdict_on(v).change, None);
    let plan = w.reconcile();
    assert_eq!(effects(&plan), vec![w.seal_action(v)], "sealed and held");
    assert_eq!(event_reasons(&plan), ["!RolloverHeld"]);
    let run = plan.status.current_run.as_ref().unwrap();
    assert_eq!((run.phase, run.reason.as_deref()), (RunPhase::AwaitingApproval, Some(HoldReason::ChangeNotCounted.as_str())));
    assert_eq!(
        run.message.as_deref(),
        Some(
            "the change of v2 from v1 could not be counted from their index files (v1 has none, or it could not be read), \
             so maxChangeRatio 0.5 cannot be checked"
        )
    );
    assert_eq!(cond(&plan.status, ROLLOVER_HELD), is("True", "ChangeNotCounted"));
    assert!(events(&plan)[0].message.ends_with("approve with the annotation segmentation.dev/approve-version=\"2\""));
    assert!(w.reconcile().actions.is_empty(), "held once, reported once");
    w.annotate(APPROVE_VERSION_ANNOTATION, "2");
    let plan = w.reconcile();
    assert_eq!(effects(&plan), vec![Action::Activate { version: 2, previous: Some(1) }]);

    // Counted against another version than the one readers are on.
    let (mut w, v) = world();
    w.succeed_with_verdict(v, |seal| seal.change = Some(CountedChange { from: 7, changed: 0 }));
    let plan = w.reconcile();
    let run = plan.status.current_run.as_ref().unwrap();
    assert_eq!((run.phase, run.reason.as_deref()), (RunPhase::AwaitingApproval, Some("ChangeNotCounted")));
    assert!(run.message.as_deref().unwrap().starts_with("the change of v2 was counted from v7, not from v1"), "{run:?}");

    // Without a change limit nothing needs counting.
    let (mut w, v) = world();
    w.edit(|s| s.rollover.max_change_ratio = None);
    w.without_index.insert(1);
    w.succeed(v, Ingest);
    assert!(w.reconcile().actions.contains(&Action::Activate { version: v, previous: Some(1) }));
}

#[test]
fn a_relaxed_guard_releases_a_held_version() {
    let mut w = World::new(&spec("rollover:\n  minMembers: 5\n"));
    w.reconcile();
    w.complete_run();
    assert_eq!(w.run().phase, RunPhase::AwaitingApproval);
    w.edit(|s| s.rollover.min_members = 3);
    let plan = w.reconcile();
    assert_eq!(effects(&plan), vec![Action::Activate { version: 1, previous: None }]);
}

// ---------------------------------------------------------------------------
// pinVersion
// ---------------------------------------------------------------------------

#[test]
fn pinning_an_older_version_rolls_back_and_unpinning_returns_to_the_newest() {
    let mut w = world_with_v1(&spec(""));
    w.members.insert(2, users(&["u1", "u2", "u3", "u4"]));
    w.advance(Duration::minutes(1));
    rerun(&mut w);
    w.complete_run();
    assert_eq!(w.store_active(), Some(2));

    w.edit(|s| s.pin_version = Some(1));
    let plan = w.reconcile();
    assert_eq!(effects(&plan), vec![Action::Activate { version: 1, previous: Some(2) }]);
    assert_eq!(event_reasons(&plan), ["RolledBack"]);
    assert_eq!(events(&plan)[0].message, "readers switched from v2 back to v1");
    assert_eq!(version_states(&plan.status), [(2, VersionState::Retained), (1, VersionState::Active)]);
    assert_eq!((plan.status.active_version, plan.status.members), (Some(1), Some(3)));
    assert_eq!(w.store_active(), Some(1));

    // A version that finishes while pinned is kept, not served.
    w.advance(Duration::minutes(1));
    rerun(&mut w);
    let plan = w.complete_run();
    assert!(!plan.actions.iter().any(|a| matches!(a, Action::Activate { .. })), "{:?}", plan.actions);
    assert_eq!(version_states(w.status()), [(3, VersionState::Retained), (2, VersionState::Retained), (1, VersionState::Active)]);
    assert_eq!(w.store_active(), Some(1));
    assert_eq!(cond(w.status(), READY), is("True", "VersionActive"));

    w.edit(|s| s.pin_version = None);
    let plan = w.reconcile();
    assert_eq!(effects(&plan), vec![Action::Activate { version: 3, previous: Some(1) }]);
    assert_eq!(event_reasons(&plan), ["RolledOver"]);
    assert_eq!(w.store_active(), Some(3));
}

#[test]
fn pinning_a_version_that_is_gone_keeps_serving_and_says_why() {
    let mut w = world_with_v1(&spec("retention:\n  keepVersions: 1\n"));
    w.advance(Duration::minutes(1));
    rerun(&mut w);
    w.complete_run();
    w.advance(w.cfg.reader_grace);
    w.settle();
    assert_eq!(w.store_versions(), [2], "keepVersions 1 removed v1 after the reader grace");

    for pin in [1, 9] {
        w.edit(|s| s.pin_version = Some(pin));
        let plan = w.reconcile();
        assert!(effects(&plan).is_empty(), "{:?}", plan.actions);
        let ready = condition(&plan.status, READY);
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "PinnedVersionUnavailable"));
        assert_eq!(ready.message, format!("pinVersion {pin} is not a retained version (retained: v2)"));
        assert_eq!(cond(&plan.status, STALLED), is("True", "PinnedVersionUnavailable"));
        assert_eq!(plan.status.active_version, Some(2));
        assert_eq!(w.store_active(), Some(2));
    }
}

// ---------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------

#[test]
fn retention_keeps_keep_versions_and_deletes_the_oldest() {
    let mut w = world_with_v1(&spec("retention:\n  keepVersions: 2\n"));
    for _ in 0..2 {
        w.advance(Duration::minutes(1));
        rerun(&mut w);
        w.complete_run();
    }
    assert_eq!(version_states(w.status()), [(3, VersionState::Active), (2, VersionState::Retained)]);
    assert_eq!(w.store_versions(), [2, 3]);
    assert!(w
        .events
        .iter()
        .any(|e| e.reason == EventReason::VersionDeleted && e.message == "v1 deleted by retention (keepVersions 2)"));
}

/// `keepVersions: 1` keeps the version readers are switched away from
/// for the reader grace: a serving replica that missed the notice still
/// answers from it until it re-reads the aliases.
#[test]
fn retention_deletes_the_version_readers_leave_only_after_the_reader_grace() {
    let mut w = world_with_v1(&spec("retention:\n  keepVersions: 1\n"));
    w.advance(Duration::minutes(1));
    let v = rerun_to_ingesting(&mut w);
    w.succeed(v, Ingest);
    let switched_at = w.now;
    let plan = w.reconcile();
    assert_eq!(effects(&plan), vec![w.seal_action(2), Action::Activate { version: 2, previous: Some(1) }]);
    assert_eq!(version_states(&plan.status), [(2, VersionState::Active), (1, VersionState::Retained)]);
    assert_eq!(version(&plan.status, 1).retired_at, Some(switched_at));
    assert_eq!(version(&plan.status, 2).retired_at, None);
    let grace_ends = switched_at + w.cfg.reader_grace;
    assert!(plan.requeue_at.is_some_and(|at| at <= grace_ends), "looks again by the end of the grace: {:?}", plan.requeue_at);

    w.advance_to(grace_ends - Duration::seconds(1));
    assert!(effects(&w.reconcile()).is_empty(), "v1 is kept during the grace");
    assert_eq!(w.store_versions(), [1, 2]);

    w.advance_to(grace_ends);
    let plan = w.reconcile();
    let v2_snapshot = version(&plan.status, 2).snapshot_time;
    assert_eq!(effects(&plan), vec![Action::DeleteVersion { version: 1 }, Action::PruneOverrides { older_than: v2_snapshot }]);
    assert_eq!(version_states(&plan.status), [(2, VersionState::Active)]);
    assert_eq!(w.store_versions(), [2]);
    assert!(effects(&w.reconcile()).is_empty());
}

/// A rollback starts the grace of the version it leaves, like a rollover.
#[test]
fn a_rollback_keeps_the_version_it_leaves_for_the_reader_grace() {
    let mut w = world_with_v1(&spec("retention:\n  keepVersions: 2\n"));
    w.advance(Duration::minutes(1));
    rerun(&mut w);
    w.complete_run();
    w.advance(w.cfg.reader_grace);
    w.edit(|s| s.pin_version = Some(1));
    let pinned_at = w.now;
    let plan = w.reconcile();
    assert_eq!(effects(&plan), vec![Action::Activate { version: 1, previous: Some(2) }]);
    assert_eq!(version(&plan.status, 2).retired_at, Some(pinned_at));
    w.edit(|s| s.retention.keep_versions = 1);
    assert!(effects(&w.reconcile()).is_empty(), "v2 is in its grace");
    w.advance(w.cfg.reader_grace);
    let v1_snapshot = version(w.status(), 1).snapshot_time;
    assert_eq!(
        effects(&w.reconcile()),
        vec![Action::DeleteVersion { version: 2 }, Action::PruneOverrides { older_than: v1_snapshot }]
    );
}

#[test]
fn retention_never_deletes_the_pinned_version() {
    let mut w = world_with_v1(&spec("retention:\n  keepVersions: 2\n"));
    w.advance(Duration::minutes(1));
    rerun(&mut w);
    w.complete_run();
    w.edit(|s| s.pin_version = Some(1));
    w.settle();
    for _ in 0..3 {
        w.advance(Duration::minutes(1));
        rerun(&mut w);
        w.complete_run();
    }
    // v1 is pinned and active; one more slot holds the newest.
    assert_eq!(version_states(w.status()), [(5, VersionState::Retained), (1, VersionState::Active)]);
    assert_eq!(w.store_versions(), [1, 5]);
    assert_eq!(w.store_active(), Some(1));
}

fn include(user: &str, ts: chrono::DateTime<chrono::Utc>) -> Override {
    Override { user: user.into(), op: OverrideOp::Include, ts, id: format!("{user}@{ts}"), offset: None }
}

/// Activating a version (a rollback included) only switches readers: the
/// realtime overrides recorded meanwhile stay recorded, and serving lays
/// those the version does not reflect over its index file
/// (`StoredVersion::reflects_events_until`); nothing is applied into
/// member sets.
#[test]
fn a_rollback_switches_readers_and_leaves_the_overrides_to_serving() {
    let mut w = world_with_v1(&spec("retention:\n  keepVersions: 3\n"));
    w.advance(Duration::minutes(1));
    rerun(&mut w);
    w.complete_run();
    assert_eq!(w.store_active(), Some(2));
    let recorded = w.now;
    w.block_on(w.store.record_override(&key(), &include("zed", recorded))).unwrap();

    w.edit(|s| s.pin_version = Some(1));
    let plan = w.reconcile();
    assert_eq!(effects(&plan), vec![Action::Activate { version: 1, previous: Some(2) }]);
    assert_eq!(w.store_active(), Some(1));
    let v1 = w.block_on(w.store.versions(&key())).unwrap()[&1].clone();
    assert_eq!(v1.members, 3, "the count recorded at sealing");
    let since = v1.reflects_events_until().expect("v1 says what it reflects");
    let pending: Vec<String> = w.block_on(w.store.overrides_since(&key(), since)).unwrap().into_iter().map(|o| o.user).collect();
    assert_eq!(pending, ["zed"], "what serving lays over v1's index");
}

/// Once retention deletes versions, overrides from before what every kept
/// version reflects are forgotten; later ones stay.
#[test]
fn retention_prunes_the_overrides_no_kept_version_needs() {
    let mut w = world_with_v1(&spec("retention:\n  keepVersions: 1\n"));
    let v1_snapshot = w.now;
    w.block_on(w.store.record_override(&key(), &include("early", v1_snapshot + Duration::seconds(10)))).unwrap();
    w.advance(Duration::minutes(5));
    let v2_snapshot = w.now;
    rerun(&mut w);
    w.complete_run();
    w.block_on(w.store.record_override(&key(), &include("late", v2_snapshot + Duration::seconds(10)))).unwrap();
    w.advance(w.cfg.reader_grace);
    let plan = w.reconcile();
    assert_eq!(
        effects(&plan),
        vec![Action::DeleteVersion { version: 1 }, Action::PruneOverrides { older_than: v2_snapshot }],
        "v2 reflects the lake until its snapshot"
    );
    let left: Vec<String> = w
        .block_on(w.store.overrides_since(&key(), v1_snapshot - Duration::days(1)))
        .unwrap()
        .into_iter()
        .map(|o| o.user)
        .collect();
    assert_eq!(left, ["late"]);
}

/// The table versions ingest recorded with a version (from its manifest)
/// are in its status, for `kubectl segment status`.
#[test]
fn the_table_versions_a_version_read_are_in_its_status() {
    use segment_core::manifest::SourceRead;
    let mut w = world_with_v1(&spec(""));
    w.advance(Duration::minutes(1));
    let v = rerun_to_ingesting(&mut w);
    let read = SourceRead { table: "orders".into(), format: SourceFormat::Delta, version: Some(7) };
    w.succeed_with_verdict(v, |seal| seal.table_versions = vec![read.clone()]);
    let plan = w.reconcile();
    assert_eq!(version(&plan.status, v).table_versions, vec![read]);
    assert!(version(&plan.status, 1).table_versions.is_empty());
}

#[test]
fn failed_history_is_bounded() {
    let mut w = world_with_v1(&spec(""));
    w.cfg.failed_history = 2;
    for _ in 0..4 {
        w.advance(Duration::minutes(1));
        let v = rerun(&mut w);
        w.fail(v, Compute, "QueryError: division by zero");
        w.reconcile();
    }
    assert_eq!(version_states(w.status()), [(5, VersionState::Failed), (4, VersionState::Failed), (1, VersionState::Active)]);
}

// ---------------------------------------------------------------------------
// Compute slots
// ---------------------------------------------------------------------------

#[test]
fn a_run_waits_for_a_compute_slot() {
    let mut w = World::new(&spec(""));
    w.slot_free = false;
    let plan = w.reconcile();
    assert!(effects(&plan).is_empty(), "{:?}", plan.actions);
    assert_eq!(event_reasons(&plan), ["RunStarted"]);
    let run = plan.status.current_run.as_ref().unwrap();
    assert_eq!((run.version, run.phase, run.job.as_deref()), (1, RunPhase::Pending, None));
    assert_eq!(run.reason.as_deref(), Some("WaitingForComputeSlot"));
    assert_eq!(plan.requeue_at, Some(w.now + Duration::seconds(15)));
    assert_eq!(cond(&plan.status, READY), is("False", "Pending"));

    w.advance(Duration::seconds(15));
    let plan = w.reconcile();
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);

    w.slot_free = true;
    w.advance(Duration::seconds(15));
    let plan = w.reconcile();
    assert_eq!(
        launches(&plan).iter().map(|l| (l.version, l.kind, l.snapshot_time)).collect::<Vec<_>>(),
        [(1, Compute, t(CREATED))]
    );
    let run = plan.status.current_run.as_ref().unwrap();
    assert_eq!((run.phase, run.reason.as_deref(), run.job.as_deref()), (RunPhase::Computing, None, Some("vip-v1-compute")));
}

// ---------------------------------------------------------------------------
// Restarts
// ---------------------------------------------------------------------------

#[test]
fn a_restarted_operator_does_not_launch_a_running_job_again() {
    let mut w = World::new(&spec(""));
    w.reconcile();
    // A new leader sees the same status and the same running Job.
    let mut fresh = World::with_segment(w.segment.clone());
    fresh.jobs = w.jobs.clone();
    fresh.advance(Duration::minutes(3));
    let plan = fresh.plan();
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
}

#[test]
fn a_missing_job_is_launched_again_under_the_same_name() {
    let mut w = World::new(&spec(""));
    let first = w.reconcile();
    w.jobs.clear();
    w.advance(Duration::minutes(1));
    let plan = w.reconcile();
    assert_eq!(launches(&plan), launches(&first));
    assert!(events(&plan).is_empty());

    w.succeed(1, Compute);
    let ingest = w.reconcile();
    w.jobs.retain(|j| j.kind != Ingest);
    let plan = w.reconcile();
    assert_eq!(launches(&plan), launches(&ingest));
    assert_eq!(launches(&plan)[0].job_name, ingest_job(1));
}

#[test]
fn a_crash_after_the_store_actions_is_completed_without_repeating_them() {
    let mut w = world_with_v1(&spec(""));
    w.advance(Duration::minutes(1));
    let v = rerun_to_ingesting(&mut w);
    w.succeed(v, Ingest);
    let plan = w.plan();
    assert!(plan.actions.contains(&Action::Activate { version: 2, previous: Some(1) }));
    w.apply_store_actions(&plan);

    let plan = w.reconcile();
    assert!(effects(&plan).is_empty(), "{:?}", plan.actions);
    assert_eq!(version_states(&plan.status), [(2, VersionState::Active), (1, VersionState::Retained)]);
    assert_eq!(plan.status.current_run, None);
}

#[test]
fn a_crash_after_activation_then_a_definition_change_never_deletes_what_readers_see() {
    let mut w = world_with_v1(&spec(""));
    w.advance(Duration::minutes(1));
    let v = rerun_to_ingesting(&mut w);
    w.succeed(v, Ingest);
    let plan = w.plan();
    w.apply_store_actions(&plan);
    assert_eq!(w.store_active(), Some(2));

    w.edit(|s| s.definition.sql = Some("SELECT user_id FROM users".into()));
    // The run of v2 is cancelled, but readers are on v2: they go back to v1
    // first, and v2 is deleted only afterwards (`World` checks the order).
    let plan = w.reconcile();
    assert!(plan.actions.contains(&Action::CancelJobs { version: 2 }));
    assert!(!plan.actions.contains(&Action::DeleteVersion { version: 2 }), "{:?}", plan.actions);
    assert!(plan.actions.contains(&Action::Activate { version: 1, previous: Some(2) }));
    let plan = w.reconcile();
    assert_eq!(effects(&plan), vec![Action::DeleteVersion { version: 2 }]);
    assert_eq!(w.store_versions(), [1]);
    assert_eq!((w.store_active(), w.run().version, w.run().trigger), (Some(1), 3, RunTrigger::Definition));
}

#[test]
fn a_lost_status_is_rebuilt_from_the_store_and_version_numbers_are_not_reused() {
    let mut w = world_with_v1(&hourly(""));
    w.advance_to(t("2024-03-01T11:00:00Z"));
    w.reconcile();
    w.complete_run();
    w.advance_to(t("2024-03-01T12:00:00Z"));
    w.reconcile();
    w.fail(3, Compute, "QueryError: boom");
    w.reconcile();
    assert_eq!(w.store_versions(), [1, 2]);

    w.segment.status = None;
    w.advance_to(t("2024-03-01T12:30:00Z"));
    let plan = w.reconcile();
    assert!(!plan.actions.iter().any(|a| matches!(a, Action::Activate { .. } | Action::DeleteVersion { .. })));
    assert_eq!(version_states(&plan.status), [(2, VersionState::Active), (1, VersionState::Retained)]);
    assert_eq!(plan.status.active_version, Some(2));
    // The failed v3 left only its Job; its number is not given out again.
    let run = plan.status.current_run.as_ref().expect("the owed 12:00 run starts");
    assert_eq!(run.version, 4);
    assert_eq!(plan.status.latest_version, 4);
    assert_eq!(launches(&plan)[0].job_name, "vip-v4-compute");
}

/// A lost status is rebuilt from the store, but only versions readers
/// were once switched to are adopted: a version the rollover guard held
/// is deleted, never activated without the guard.
#[test]
fn a_lost_status_adopts_only_versions_that_were_once_served() {
    let mut w = world_with_v1(&spec("rollover:\n  minMembers: 3\n"));
    w.members.insert(2, users(&["u1"]));
    w.advance(Duration::minutes(1));
    let v = rerun_to_ingesting(&mut w);
    w.succeed(v, Ingest);
    w.reconcile();
    assert_eq!(w.run().phase, RunPhase::AwaitingApproval);
    assert_eq!(w.store_versions(), [1, 2]);

    w.segment.status = None;
    w.advance(Duration::minutes(1));
    let plan = w.reconcile();
    let store_actions: Vec<&Action> =
        plan.actions.iter().filter(|a| matches!(a, Action::Activate { .. } | Action::DeleteVersion { .. })).collect();
    assert_eq!(store_actions, [&Action::DeleteVersion { version: 2 }], "v2 never passed the guard");
    let discarded: Vec<&Event> = events(&plan).into_iter().filter(|e| e.reason == EventReason::VersionDiscarded).collect();
    assert_eq!(discarded.len(), 1, "{:?}", plan.actions);
    assert_eq!(discarded[0].message, "v2 is in the store but not in the status and was never served; deleted");
    assert_eq!(version_states(&plan.status), [(1, VersionState::Active)]);
    assert_eq!(w.store_active(), Some(1));
    assert_eq!(w.store_versions(), [1]);
}

/// What an interrupted delete leaves (state without the seal), and what an
/// ingest of the former per-membership layout left when it died (a partial
/// load), is deleted by the next plan, and a version being deleted is not
/// reported lost.
#[test]
fn unsealed_leftovers_are_deleted_and_an_interrupted_delete_is_finished() {
    let mut w = world_with_v1(&spec("retention:\n  keepVersions: 2\n"));
    w.advance(Duration::minutes(1));
    rerun(&mut w);
    w.complete_run();
    assert_eq!(version_states(w.status()), [(2, VersionState::Active), (1, VersionState::Retained)]);
    // v1's delete stopped after unlisting it; an ingest of v9 died mid-load.
    w.store.leave_unsealed(&key(), 1);
    w.store.leave_unsealed(&key(), 9);
    assert_eq!(w.store_unsealed(), [1, 9]);

    w.advance(Duration::minutes(1));
    let plan = w.reconcile();
    let mut deleted: Vec<Action> = effects(&plan);
    deleted.sort_by_key(|a| format!("{a:?}"));
    assert_eq!(deleted, vec![Action::DeleteVersion { version: 1 }, Action::DeleteVersion { version: 9 }]);
    assert!(!event_reasons(&plan).iter().any(|r| r.contains("VersionLost")), "{:?}", plan.actions);
    assert_eq!(version_states(&plan.status), [(2, VersionState::Active)]);
    assert!(w.store_unsealed().is_empty());
    assert!(plan.requeue_at.is_some_and(|at| at <= w.now + w.cfg.poll_interval), "the sweep looks again");
    assert!(effects(&w.reconcile()).is_empty());
}

/// Unsealed state of the run in flight's version is not a leftover.
#[test]
fn the_version_being_ingested_is_not_swept() {
    let mut w = world_with_v1(&spec(""));
    w.advance(Duration::minutes(1));
    let v = rerun_to_ingesting(&mut w);
    w.store.leave_unsealed(&key(), v);
    assert!(effects(&w.reconcile()).is_empty());
}

#[test]
fn lost_store_data_is_rebuilt_by_an_initial_run() {
    let mut w = world_with_v1(&spec(""));
    // An older failure stays in the history.
    w.advance(Duration::minutes(1));
    let v = rerun(&mut w);
    w.fail(v, Compute, "QueryError: boom");
    w.reconcile();
    w.advance(Duration::minutes(1));
    rerun(&mut w);
    w.complete_run();
    assert_eq!(w.status().active_version, Some(3));

    w.wipe_store();
    w.advance(Duration::minutes(1));
    let plan = w.reconcile();
    assert!(event_reasons(&plan).contains(&"!VersionLost".to_string()), "{:?}", plan.actions);
    assert_eq!(plan.status.active_version, None);
    let run = plan.status.current_run.as_ref().expect("a run rebuilds the segment");
    assert_eq!((run.version, run.trigger), (4, RunTrigger::Initial));
    w.complete_run();
    assert_eq!(w.store_active(), Some(4));
}

// ---------------------------------------------------------------------------
// Results collection
// ---------------------------------------------------------------------------

#[test]
fn results_are_collected_once_per_interval_keeping_what_is_in_use() {
    let mut w = World::new(&spec("retention:\n  keepResultsFor: 2d\n"));
    let plan = w.reconcile();
    assert!(!plan.actions.iter().any(|a| matches!(a, Action::CollectResults { .. })), "nothing to collect yet");
    let plan = w.complete_run();
    assert!(plan.actions.contains(&Action::CollectResults { older_than: w.now - Duration::days(2), keep: vec![1] }));
    assert_eq!(w.status().results_collected_at, Some(w.now));

    w.advance(Duration::minutes(59));
    assert!(!w.reconcile().actions.iter().any(|a| matches!(a, Action::CollectResults { .. })));

    // v2 retained, v1 pinned, v3 in flight.
    rerun(&mut w);
    w.complete_run();
    w.edit(|s| s.pin_version = Some(1));
    w.settle();
    w.advance(Duration::minutes(1));
    rerun(&mut w);
    let collects: Vec<_> = w.collected.iter().filter(|(at, _)| *at > t(CREATED)).map(|(_, a)| a.clone()).collect();
    assert_eq!(collects, [Action::CollectResults { older_than: w.now - Duration::days(2), keep: vec![1, 3] }]);
    assert_eq!(w.plan().requeue_at, Some(w.now + w.cfg.poll_interval));
}

#[test]
fn jobs_left_running_by_a_crash_after_the_status_write_are_cancelled() {
    let mut w = world_with_v1(&hourly(""));
    w.advance_to(t("2024-03-01T11:00:00Z"));
    w.reconcile();
    w.advance(Duration::minutes(2));
    w.edit(|s| s.definition.sql = Some("SELECT user_id FROM users".into()));
    // The plan supersedes v2 and starts v3; the operator stops after the
    // status write, before any Job is deleted or created.
    let plan = w.plan();
    assert!(plan.actions.contains(&Action::CancelJobs { version: 2 }));
    w.apply_store_actions(&plan);
    w.segment.status = Some(plan.status.clone());
    assert_eq!(w.job(2, Compute).map(|j| &j.state), Some(&segment_core::planner::JobState::Running));

    let plan = w.reconcile();
    let launched: Vec<(u64, _)> = launches(&plan).iter().map(|l| (l.version, l.kind)).collect();
    assert_eq!(launched, [(3, Compute)]);
    assert!(plan.actions.contains(&Action::CancelJobs { version: 2 }), "{:?}", plan.actions);
    assert!(w.job(2, Compute).is_none());
    assert!(effects(&w.reconcile()).is_empty());
}

// ---------------------------------------------------------------------------
// Properties over random histories
// ---------------------------------------------------------------------------

mod properties {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use segment_core::api::SegmentKey;
    use segment_core::executor::Step;
    use segment_core::naming::{run_job_name, JobKind};
    use segment_core::planner::{JobState, Plan};

    use super::*;

    const SQLS: [&str; 3] = ["SELECT user_id FROM orders", "SELECT user_id FROM users", "SELECT o.user_id FROM orders o"];
    const CRONS: [Option<&str>; 5] = [None, Some("0 * * * *"), Some("*/30 * * * *"), Some("@daily"), Some("0 0 * * * *")];

    /// Something that happens to the world between reconciles.
    #[derive(Debug, Clone)]
    enum Op {
        Advance(i64),
        Succeed,
        FailTransient,
        FailPermanent,
        IngestWithoutLoading,
        DropJobs,
        /// A cancelled or failed run's ingest finishes late and its
        /// version shows up in the store.
        LateLoad,
        Sql(usize),
        BreakSql,
        Cron(usize),
        Deadline(Option<i64>),
        Suspend(bool),
        Replace(bool),
        Pin(Option<u64>),
        KeepVersions(u32),
        Guard(u64, Option<f64>),
        ApproveCurrent,
        ApproveOther(u64),
        RequestRun,
        Slot(bool),
        Members(usize, usize),
        Tables(Option<usize>),
        CrashAfterStoreActions,
        CrashAfterStatus,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => prop::sample::select(vec![1i64, 7, 30, 61, 180, 1500]).prop_map(Op::Advance),
            6 => Just(Op::Succeed),
            2 => Just(Op::FailTransient),
            1 => Just(Op::FailPermanent),
            1 => Just(Op::IngestWithoutLoading),
            1 => Just(Op::DropJobs),
            1 => Just(Op::LateLoad),
            2 => (0..SQLS.len()).prop_map(Op::Sql),
            1 => Just(Op::BreakSql),
            2 => (0..CRONS.len()).prop_map(Op::Cron),
            1 => prop::option::of(prop::sample::select(vec![60i64, 600])).prop_map(Op::Deadline),
            1 => any::<bool>().prop_map(Op::Suspend),
            1 => any::<bool>().prop_map(Op::Replace),
            2 => prop::option::of(1u64..=8).prop_map(Op::Pin),
            1 => (1u32..=4).prop_map(Op::KeepVersions),
            1 => (0u64..=5, prop::option::of(prop::sample::select(vec![0.3, 1.0]))).prop_map(|(m, r)| Op::Guard(m, r)),
            2 => Just(Op::ApproveCurrent),
            1 => (1u64..=8).prop_map(Op::ApproveOther),
            2 => Just(Op::RequestRun),
            1 => any::<bool>().prop_map(Op::Slot),
            1 => (0usize..4, 1usize..=6).prop_map(|(from, n)| Op::Members(from, n)),
            1 => prop::option::of(0usize..2).prop_map(Op::Tables),
            1 => Just(Op::CrashAfterStoreActions),
            1 => Just(Op::CrashAfterStatus),
        ]
    }

    /// The world plus what the properties remember across reconciles.
    struct Sim {
        w: World,
        /// Run versions recorded in a written status.
        allocated: BTreeSet<u64>,
        highest: u64,
    }

    impl Sim {
        fn new() -> Sim {
            let mut w = World::new(&hourly(""));
            w.cfg.failed_history = 3;
            Sim { w, allocated: BTreeSet::new(), highest: 0 }
        }

        fn running_job(&self) -> Option<(u64, JobKind)> {
            let run = self.w.segment.status.as_ref()?.current_run.as_ref()?;
            self.w.jobs.iter().find(|j| j.version == run.version && j.state == JobState::Running).map(|j| (j.version, j.kind))
        }

        fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
            let w = &mut self.w;
            match op {
                Op::Advance(minutes) => w.advance(Duration::minutes(*minutes)),
                Op::Succeed => {
                    if let Some((v, kind)) = self.running_job() {
                        self.w.succeed(v, kind);
                    }
                }
                Op::FailTransient | Op::FailPermanent => {
                    if let Some((v, kind)) = self.running_job() {
                        let msg = if matches!(op, Op::FailTransient) { "UnreadableSource: timeout" } else { "QueryError: bad" };
                        self.w.fail(v, kind, msg);
                    }
                }
                Op::IngestWithoutLoading => {
                    if let Some((v, JobKind::Ingest)) = self.running_job() {
                        self.w.succeed_without_verdict(v, JobKind::Ingest);
                    }
                }
                Op::DropJobs => w.jobs.clear(),
                Op::LateLoad => {
                    let failed = w
                        .segment
                        .status
                        .as_ref()
                        .and_then(|s| s.versions.iter().filter(|v| v.state == VersionState::Failed).map(|v| v.version).max());
                    if let Some(v) = failed {
                        w.load(v);
                    }
                }
                Op::Sql(i) => w.edit(|s| s.definition.sql = Some(SQLS[*i].into())),
                Op::BreakSql => w.edit(|s| s.definition.sql = Some("SELEC user_id".into())),
                Op::Cron(i) => w.edit(|s| match CRONS[*i] {
                    None => s.schedule = None,
                    Some(cron) => {
                        let base = s.schedule.clone().unwrap_or_else(|| segment(&hourly("")).spec.schedule.unwrap());
                        s.schedule = Some(Schedule { cron: cron.into(), ..base });
                    }
                }),
                Op::Deadline(d) => w.edit(|s| {
                    if let Some(sched) = s.schedule.as_mut() {
                        sched.starting_deadline_seconds = *d;
                    }
                }),
                Op::Suspend(on) => w.edit(|s| {
                    if let Some(sched) = s.schedule.as_mut() {
                        sched.suspend = *on;
                    }
                }),
                Op::Replace(on) => w.edit(|s| {
                    if let Some(sched) = s.schedule.as_mut() {
                        sched.concurrency_policy = if *on { ConcurrencyPolicy::Replace } else { ConcurrencyPolicy::Forbid };
                    }
                }),
                Op::Pin(pin) => w.edit(|s| s.pin_version = *pin),
                Op::KeepVersions(n) => w.edit(|s| s.retention.keep_versions = *n),
                Op::Guard(min, ratio) => w.edit(|s| s.rollover = RolloverPolicy { min_members: *min, max_change_ratio: *ratio }),
                Op::ApproveCurrent => {
                    let v = w.segment.status.as_ref().and_then(|s| s.current_run.as_ref()).map_or(1, |r| r.version);
                    w.annotate(APPROVE_VERSION_ANNOTATION, &v.to_string());
                }
                Op::ApproveOther(v) => w.annotate(APPROVE_VERSION_ANNOTATION, &v.to_string()),
                Op::RequestRun => w.request_run(),
                Op::Slot(free) => w.slot_free = *free,
                Op::Members(from, n) => w.default_members = (*from..from + n).map(|i| format!("u{i}")).collect(),
                Op::Tables(tables) => {
                    w.source_tables =
                        tables.map(|i| [vec!["orders".to_string(), "users".to_string()], vec!["users".to_string()]][i].clone())
                }
                Op::CrashAfterStoreActions => {
                    let plan = self.checked_plan()?;
                    self.w.apply_store_actions(&plan);
                }
                Op::CrashAfterStatus => {
                    let plan = self.checked_plan()?;
                    self.w.apply_through(&plan, Step::Status);
                    self.record_written(&plan);
                }
            }
            Ok(())
        }

        fn record_written(&mut self, plan: &Plan) {
            self.allocated.extend(plan.status.current_run.as_ref().map(|r| r.version));
            self.highest = self.highest.max(plan.status.latest_version);
        }

        /// Plans on the world as it is and checks every property of a
        /// single plan.
        fn checked_plan(&self) -> Result<Plan, TestCaseError> {
            let w = &self.w;
            let view = w.store_view();
            let plan = w.plan_with(&view);
            prop_assert_eq!(&plan, &w.plan_with(&view), "planning is deterministic");

            let before = w.segment.status.clone().unwrap_or_default();
            let spec = &w.segment.spec;
            let failed_before: BTreeSet<u64> =
                before.versions.iter().filter(|v| v.state == VersionState::Failed).map(|v| v.version).collect();
            let run = plan.status.current_run.as_ref();

            // At most one run, and only its Jobs are launched, once each.
            let launched = launches(&plan);
            prop_assert!(launched.len() <= 1, "one Job per plan: {:?}", plan.actions);
            for l in &launched {
                prop_assert_eq!(Some(l.version), run.map(|r| r.version), "a Launch belongs to the run in flight");
                prop_assert_eq!(&l.job_name, &run_job_name(&SegmentKey::new(NAMESPACE, NAME), l.version, l.kind));
                prop_assert!(!w.jobs.iter().any(|j| j.name == l.job_name), "Launch of an existing Job {}", l.job_name);
                let phase = run.map(|r| r.phase);
                let expected = if l.kind == JobKind::Compute { RunPhase::Computing } else { RunPhase::Ingesting };
                prop_assert_eq!(phase, Some(expected));
            }

            // A new run takes a number never used before.
            if let Some(run) = run {
                if before.current_run.as_ref().map(|r| r.version) != Some(run.version) {
                    let used = self.allocated.iter().copied().chain(view.versions.keys().copied()).max().unwrap_or(0);
                    prop_assert!(run.version > used.max(self.highest), "v{} reuses a number (used up to {used})", run.version);
                    prop_assert!(!self.allocated.contains(&run.version));
                }
                prop_assert!(plan.status.latest_version >= run.version);
            }
            if let Some(run) = run.filter(|r| before.current_run.as_ref().map(|b| b.version) != Some(r.version)) {
                let requested = w.segment.metadata.annotations.as_ref().and_then(|a| a.get(RUN_REQUESTED_ANNOTATION));
                let schedule = spec.schedule.as_ref();
                if schedule.is_some_and(|s| s.suspend) {
                    prop_assert_eq!(run.trigger, RunTrigger::Manual, "only a request starts a run while suspended");
                }
                match run.trigger {
                    RunTrigger::Manual => {
                        prop_assert!(
                            requested.is_some() && requested != before.handled_run_request.as_ref(),
                            "a request runs once"
                        );
                    }
                    RunTrigger::Schedule => {
                        let cron = segment_core::schedule::CronSchedule::parse(schedule.unwrap()).unwrap();
                        let after = before.last_schedule_time.unwrap_or(t(CREATED));
                        prop_assert_eq!(cron.latest_due(after, w.now), Some(run.snapshot_time), "the latest due time");
                        prop_assert_eq!(plan.status.last_schedule_time, Some(run.snapshot_time));
                    }
                    _ => {}
                }
                if run.trigger != RunTrigger::Schedule {
                    prop_assert_eq!(run.snapshot_time, w.now);
                }
                if requested.is_some() {
                    prop_assert_eq!(plan.status.handled_run_request.as_ref(), requested, "one run answers every request due");
                }
            }
            prop_assert!(plan.status.latest_version >= before.latest_version, "latest_version never goes down");

            // A version is sealed only from a sound verdict on the run in
            // flight, first of all, and the rest of the plan sees it sealed.
            let mut sealed = view.versions.clone();
            for (i, action) in plan.actions.iter().enumerate() {
                if let Action::Seal { version, seal } = action {
                    prop_assert_eq!(i, 0, "Seal comes first: {:?}", plan.actions);
                    let in_flight = before.current_run.as_ref().map(|r| (r.version, r.phase));
                    prop_assert_eq!(in_flight, Some((*version, RunPhase::Ingesting)), "Seal of a run not being ingested");
                    prop_assert!(!view.versions.contains_key(version) && !view.fenced.contains(version));
                    prop_assert_eq!(view.verdict.as_ref(), Some(&segment_core::seal::Verdict::Sealable(seal.clone())));
                    sealed.insert(*version, seal.stored(false));
                }
            }
            let forbid = spec.schedule.as_ref().is_none_or(|s| s.concurrency_policy == ConcurrencyPolicy::Forbid);
            for action in &plan.actions {
                match action {
                    Action::Activate { version, previous } => {
                        prop_assert_eq!(*previous, view.active);
                        prop_assert!(sealed.contains_key(version), "Activate of v{} not in the store", version);
                        prop_assert!(!failed_before.contains(version), "Activate of failed v{}", version);
                        prop_assert_eq!(plan.status.active_version, Some(*version));
                    }
                    Action::DeleteVersion { version } => {
                        prop_assert_ne!(Some(*version), plan.status.active_version, "DeleteVersion of the active version");
                        let pinned_and_stored = spec.pin_version == Some(*version) && sealed.contains_key(version);
                        prop_assert!(!pinned_and_stored, "DeleteVersion of the pinned v{}", version);
                    }
                    Action::CancelJobs { version } if forbid => {
                        let entry = plan.status.versions.iter().find(|v| v.version == *version);
                        // Stray Jobs of a run replaced earlier (under Replace, before a
                        // crash) may still be cancelled now; a new replacement may not.
                        let replaced_now =
                            !failed_before.contains(version) && entry.is_some_and(|v| v.reason.as_deref() == Some("Replaced"));
                        prop_assert!(!replaced_now, "a run replaced under Forbid: {:?}", plan.actions);
                    }
                    _ => {}
                }
            }
            // Exactly the readers' version after the store actions.
            if let Some(active) = plan.status.active_version {
                let activated = plan.actions.iter().any(|a| matches!(a, Action::Activate { version, .. } if *version == active));
                prop_assert!(activated || view.active == Some(active), "status says v{active}, readers see {:?}", view.active);
                let members = sealed.get(&active).map(|v| v.members);
                prop_assert_eq!(plan.status.members, members);
            }
            prop_assert!(plan.requeue_at.is_none_or(|at| at > w.now), "requeue_at {:?} is not after now", plan.requeue_at);
            let ready = condition(&plan.status, READY);
            let invalid = ready.reason.starts_with("Invalid");
            prop_assert!(!invalid || launched.is_empty(), "Launch with an invalid spec: {:?}", plan.actions);
            prop_assert!(ready.status == "False" || plan.status.active_version.is_some(), "Ready without a version");
            let types: Vec<&str> = plan.status.conditions.iter().map(|c| c.type_.as_str()).collect();
            let expected: Vec<&str> = ConditionType::ALL.iter().map(|t| t.as_str()).collect();
            prop_assert_eq!(types, expected);
            Ok(plan)
        }

        /// Reconciles until a plan has nothing to do and leaves the status
        /// as it was; a plan never repeats what the previous one did.
        fn settle(&mut self) -> Result<(), TestCaseError> {
            let mut previous: Option<Plan> = None;
            for _ in 0..8 {
                let plan = self.checked_plan()?;
                if let Some(prev) = &previous {
                    for action in &plan.actions {
                        let repeated =
                            matches!(action, Action::Activate { .. } | Action::DeleteVersion { .. } | Action::Launch(_))
                                && prev.actions.contains(action);
                        prop_assert!(!repeated, "{:?} repeated after it was applied", action);
                    }
                }
                let unchanged = self.w.segment.status.as_ref() == Some(&plan.status);
                if plan.actions.is_empty() && unchanged {
                    return Ok(());
                }
                self.w.apply(&plan);
                self.record_written(&plan);
                self.check_world()?;
                previous = Some(plan);
            }
            Err(TestCaseError::fail(format!("no fixed point after 8 reconciles: {previous:#?}")))
        }

        /// What must hold after a plan is fully applied.
        fn check_world(&self) -> Result<(), TestCaseError> {
            let w = &self.w;
            let st = w.status();
            let in_flight = st.current_run.as_ref().map(|r| r.version);
            for job in &w.jobs {
                if job.state == JobState::Running {
                    prop_assert_eq!(Some(job.version), in_flight, "a Job runs outside the run in flight: {:?}", job);
                }
            }
            if let Some(active) = st.active_version {
                prop_assert_eq!(w.store_active(), Some(active));
            }
            let stored = w.store_versions();
            for v in &st.versions {
                if matches!(v.state, VersionState::Active | VersionState::Retained) {
                    prop_assert!(stored.contains(&v.version), "v{} is listed servable but not stored", v.version);
                }
            }
            let keep = w.segment.spec.retention.keep_versions.max(1) as usize;
            let servable =
                st.versions.iter().filter(|v| matches!(v.state, VersionState::Active | VersionState::Retained)).count();
            let protected = [st.active_version, w.segment.spec.pin_version].into_iter().flatten().collect::<BTreeSet<_>>().len();
            // Every version readers left within the reader grace is kept
            // too (two switches in a row keep two).
            let grace_from = w.now - w.cfg.reader_grace;
            let in_grace = st
                .versions
                .iter()
                .filter(|v| matches!(v.state, VersionState::Active | VersionState::Retained))
                .filter(|v| v.retired_at.is_some_and(|t| t > grace_from))
                .count();
            prop_assert!(servable <= keep.max(protected + in_grace) + 1, "{servable} servable versions with keepVersions {keep}");
            let failed = st.versions.iter().filter(|v| v.state == VersionState::Failed).count();
            prop_assert!(failed <= w.cfg.failed_history);
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, max_shrink_iters: 4000, ..ProptestConfig::default() })]

        #[test]
        fn lifecycle_invariants_hold_over_random_histories(ops in prop::collection::vec((op(), prop::bool::weighted(0.7)), 1..60)) {
            let mut sim = Sim::new();
            sim.settle()?;
            // Without a reconcile after it, the next op lands in the same
            // observation (a Job finishing as a run comes due).
            for (op, reconcile) in &ops {
                sim.apply(op)?;
                if *reconcile {
                    sim.settle()?;
                }
            }
            sim.settle()?;
        }
    }
}

/// A Job whose pod never starts (the adapter found why: an image that
/// cannot be pulled) fails its run at the pod start timeout, not at the
/// Job's deadline: the reason is the pod's, its Jobs are deleted (the
/// compute slot is freed), v1 keeps serving and a retry is planned.
#[test]
fn a_pod_that_does_not_start_fails_the_run_at_the_start_timeout_with_its_reason() {
    let mut w = world_with_v1(&spec(""));
    w.request_run();
    w.settle();
    assert_eq!(w.run().version, 2);
    let why = Failure::new(FailureReason::ImagePullFailed, "image registry.invalid/w could not be pulled: not found");
    w.job_mut(2, Compute).not_started = Some(why);
    w.advance(w.cfg.pod_start_timeout - Duration::seconds(1));
    let plan = w.reconcile();
    assert!(plan.status.current_run.is_some(), "not yet: {:?}", event_reasons(&plan));
    w.advance(Duration::seconds(1));
    let plan = w.reconcile();
    assert!(plan.actions.contains(&Action::CancelJobs { version: 2 }), "{:?}", plan.actions);
    assert_eq!(event_reasons(&plan), ["!RunFailed"]);
    let v2 = version(&plan.status, 2);
    assert_eq!((v2.state, v2.reason.as_deref()), (VersionState::Failed, Some("ImagePullFailed")));
    assert!(v2.message.as_deref().unwrap().contains("could not be pulled"));
    assert_eq!(plan.status.active_version, Some(1));
    assert!(plan.status.retry_at.is_some(), "an image may appear: retried");
}

/// A running pod is left alone however long it runs, until its Job's own
/// deadline plus the grace: then the run fails as `DeadlineExceeded`
/// even if the Job controller never marked the Job failed.
#[test]
fn a_job_running_past_its_own_deadline_fails_the_run() {
    let mut w = world_with_v1(&spec(""));
    w.request_run();
    w.settle();
    w.job_mut(2, Compute).deadline = Some(Duration::minutes(10));
    w.advance(Duration::minutes(10) + w.cfg.deadline_grace - Duration::seconds(1));
    assert!(w.reconcile().status.current_run.is_some(), "within the deadline and its grace");
    w.advance(Duration::seconds(1));
    let plan = w.reconcile();
    assert!(plan.actions.contains(&Action::CancelJobs { version: 2 }));
    assert_eq!(version(&plan.status, 2).reason.as_deref(), Some("DeadlineExceeded"));
    assert_eq!(plan.status.active_version, Some(1));
}

/// A Job the API server refuses fails its run once as `JobRejected`: the
/// Segment is Stalled (though v1 serves), nothing is retried while the
/// spec stays the same, and a spec change tries again.
#[test]
fn a_rejected_job_stalls_the_segment_until_its_spec_changes() {
    let mut w = world_with_v1(&spec(""));
    w.request_run();
    w.settle();
    w.fail(2, Compute, "JobRejected: Job.batch \"vip-v2-compute\" is invalid: spec.template.spec.containers[0].resources.requests[cpu]: Invalid value: \"lots\"");
    let plan = w.reconcile();
    assert_eq!(event_reasons(&plan), ["!RunFailed"]);
    assert_eq!(plan.status.retry_at, None, "not retried");
    let stalled = condition(&plan.status, STALLED);
    assert_eq!((stalled.status.as_str(), stalled.reason.as_str()), ("True", "JobRejected"));
    assert!(stalled.message.contains("Invalid value"), "{}", stalled.message);
    assert_eq!(cond(&plan.status, READY).0, "True", "v1 keeps serving");
    w.advance(Duration::hours(6));
    let plans = w.settle();
    assert!(plans.iter().all(|p| launches(p).is_empty() && events(p).is_empty()), "no retry loop");

    w.edit(|spec| spec.description = Some("fixed the resources".into()));
    let plan = w.reconcile();
    assert_eq!(w.run().version, 3);
    assert_eq!(w.run().trigger, RunTrigger::Retry);
    assert_eq!(event_reasons(&plan), ["RunStarted"]);
}

/// A run killed for its memory is not retried while the spec stays the
/// same (the same data in the same limit runs out again); a spec change
/// (a higher limit) tries again at once.
#[test]
fn an_out_of_memory_run_waits_for_a_spec_change() {
    let mut w = world_with_v1(&spec(""));
    w.request_run();
    w.settle();
    let failure = Failure::new(FailureReason::OutOfMemory, "the worker was killed for going over its memory limit");
    let now = w.now;
    w.job_mut(2, Compute).state = segment_core::planner::JobState::Failed { finished_at: now, failure };
    let plan = w.reconcile();
    assert_eq!(plan.status.retry_at, None, "not retried");
    w.advance(Duration::hours(6));
    assert!(w.settle().iter().all(|p| launches(p).is_empty()), "nothing runs while the spec stays the same");
    w.edit(|spec| spec.description = Some("more memory".into()));
    w.reconcile();
    assert_eq!((w.run().version, w.run().trigger), (3, RunTrigger::Retry));
}
