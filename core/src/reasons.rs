//! The project's vocabularies as types: condition types, Event reasons,
//! spec problems and run failure reasons. The operator, the workers, the
//! kubectl plugin and the metrics all match on these enums, so renaming or
//! adding a reason is a compile error wherever it must be handled, and the
//! decisions attached to a reason (is a failure retried? is an Event a
//! warning?) are exhaustive matches rather than lists a reason can be
//! missing from. The strings are what users see in `status`, Events and
//! the termination log; `docs/compute.md` and `docs/lifecycle.md` list
//! them, and `core/tests/reasons.rs` keeps those tables equal to the enums.

use std::fmt;
use std::str::FromStr;

/// A string that names no variant of a reason enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown reason `{0}`")]
pub struct UnknownReason(pub String);

/// Declares a fieldless enum whose variants are written as their names:
/// `as_str`, `Display`, `FromStr` and `ALL`.
macro_rules! string_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$variant_meta:meta])* $variant:ident,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The name users see.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => stringify!($variant),)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownReason;

            fn from_str(text: &str) -> Result<Self, UnknownReason> {
                Self::ALL.iter().copied().find(|r| r.as_str() == text).ok_or_else(|| UnknownReason(text.to_string()))
            }
        }
    };
}

string_enum! {
    /// The conditions of `status.conditions`, kstatus-style.
    pub enum ConditionType {
        /// A version is served.
        Ready,
        /// A run of the current definition is in flight and no version of
        /// that definition exists yet.
        Reconciling,
        /// The spec cannot be realised without a change.
        Stalled,
        /// A version waits for approval.
        RolloverHeld,
    }
}

string_enum! {
    /// Why a spec cannot be run: the `Ready` condition's reason and the
    /// warning Event's reason.
    pub enum SpecProblem {
        /// Not exactly one definition kind, SQL that does not parse, an
        /// undeclared table, a rule that does not compile.
        InvalidDefinition,
        /// The cron expression or time zone does not parse.
        InvalidSchedule,
        /// Any other field out of range.
        InvalidSpec,
        /// The namespace's ComputeClass does not allow it: more resources
        /// than its maximum, a source outside its allowed prefixes, a
        /// local file, or a class that does not exist.
        NotAllowed,
    }
}

string_enum! {
    /// The reasons of the Events the operator publishes on a Segment.
    pub enum EventReason {
        RunStarted,
        /// A run's Job failed; the message says why and what keeps serving.
        RunFailed,
        /// A run in flight was cancelled (the definition changed, or
        /// `concurrencyPolicy: Replace`).
        RunCancelled,
        /// A scheduled run was skipped: past `startingDeadlineSeconds`.
        MissedSchedule,
        /// A version is loaded into the store.
        VersionReady,
        /// A servable version vanished from the store.
        VersionLost,
        /// Retention removed a version.
        VersionDeleted,
        /// A version found in the store that the status does not list and
        /// that was never served was deleted instead of adopted.
        VersionDiscarded,
        /// Readers switched to a newer version.
        RolledOver,
        /// Readers switched back to an older version.
        RolledBack,
        /// The rollover guard holds a version until it is approved.
        RolloverHeld,
        /// Readers are switched to a version once every live serving
        /// replica has loaded it; some have not yet. Also the `Ready`
        /// condition's reason while the switch waits.
        WaitingForReplicas,
        /// Serving replicas did not load a version within the operator's
        /// `--replica-load-timeout-seconds`: readers were switched anyway,
        /// and those replicas switch when they have it.
        ReplicaLoadTimedOut,
        InvalidDefinition,
        InvalidSchedule,
        InvalidSpec,
        NotAllowed,
    }
}

impl EventReason {
    /// Whether the Event is a `Warning` (something needs a person) rather
    /// than `Normal`.
    pub fn is_warning(self) -> bool {
        match self {
            EventReason::RunFailed
            | EventReason::MissedSchedule
            | EventReason::VersionLost
            | EventReason::RolloverHeld
            | EventReason::ReplicaLoadTimedOut
            | EventReason::InvalidDefinition
            | EventReason::InvalidSchedule
            | EventReason::InvalidSpec
            | EventReason::NotAllowed => true,
            EventReason::RunStarted
            | EventReason::RunCancelled
            | EventReason::VersionReady
            | EventReason::VersionDeleted
            | EventReason::VersionDiscarded
            | EventReason::RolledOver
            | EventReason::RolledBack
            | EventReason::WaitingForReplicas => false,
        }
    }
}

impl From<SpecProblem> for EventReason {
    fn from(problem: SpecProblem) -> EventReason {
        match problem {
            SpecProblem::InvalidDefinition => EventReason::InvalidDefinition,
            SpecProblem::InvalidSchedule => EventReason::InvalidSchedule,
            SpecProblem::InvalidSpec => EventReason::InvalidSpec,
            SpecProblem::NotAllowed => EventReason::NotAllowed,
        }
    }
}

string_enum! {
    /// Why the rollover guard holds a version (`AwaitingApproval`): the
    /// run's `reason` and the `RolloverHeld` condition's. `docs/lifecycle.md`
    /// lists them.
    pub enum HoldReason {
        /// The version has fewer members than `rollover.minMembers`.
        BelowMinMembers,
        /// More of the active version's members entered or left than
        /// `rollover.maxChangeRatio` allows.
        ChangeRatioExceeded,
        /// `rollover.maxChangeRatio` is set but the change from the active
        /// version could not be counted: ingest counts it from the two
        /// versions' index files, and the active one has none (computed
        /// before index files), or readers were switched to another
        /// version since the run started.
        ChangeNotCounted,
    }
}

string_enum! {
    /// Why a run failed: what the worker wrote to its termination log
    /// (`Reason: message`), or what the operator concluded without one.
    /// Recorded in `status.versions[].reason`.
    pub enum FailureReason {
        // Written by the workers.
        InvalidDefinition,
        UnknownTable,
        UnknownColumn,
        QueryError,
        NotOneColumn,
        SegmentNotReady,
        UnreadableSource,
        /// A Delta table has no commit at or before the snapshot time, or
        /// an Iceberg table no snapshot current then: the snapshot is older
        /// than the table, or its history was removed (expired).
        SnapshotBeforeHistory,
        /// A Delta or Iceberg table needs a feature the worker does not
        /// support (deletion vectors, column mapping, delete files), its
        /// `uri` is not a table root, or an Iceberg table's catalog or
        /// files are not where the ComputeClass allows.
        UnsupportedSource,
        ResourcesExhausted,
        WriteFailed,
        BadTask,
        NoResult,
        CorruptResult,
        StoreUnavailable,
        // Concluded by the operator.
        /// The worker's termination message names no known reason.
        WorkerFailed,
        /// The ingest Job succeeded but left no sound verdict to seal the
        /// version with (`_seal.json` missing, damaged or not the run's),
        /// or the version was deleted meanwhile and cannot be sealed.
        IngestIncomplete,
        /// The Job ran past its `activeDeadlineSeconds`.
        DeadlineExceeded,
        /// The Job's pods failed (killed, evicted, out of memory) without a
        /// termination message, more often than its backoff limit.
        BackoffLimitExceeded,
        /// The Job failed for another reason of the Job controller.
        JobFailed,
        /// The worker was killed for going over its memory limit.
        OutOfMemory,
        /// The kubelet ended the pod for a reason of its own (evicted,
        /// lost with its node).
        PodFailed,
        /// The pod's image could not be pulled (unknown image, registry
        /// down).
        ImagePullFailed,
        /// The scheduler found no node for the pod.
        Unschedulable,
        /// The container could not be configured (a missing Secret or
        /// ConfigMap).
        ContainerConfigError,
        /// The Job controller could not create a pod (a missing
        /// ServiceAccount, a quota).
        PodNotCreated,
        /// The API server refused the Job itself (an invalid quantity in
        /// `spec.compute`).
        JobRejected,
    }
}

impl FailureReason {
    /// Whether running the same definition again can succeed: the operator
    /// retries transient failures with a backoff, and waits for a spec
    /// change (or the next scheduled run) after a permanent one.
    pub fn is_transient(self) -> bool {
        match self {
            // The definition itself is wrong.
            FailureReason::InvalidDefinition
            | FailureReason::UnknownTable
            | FailureReason::UnknownColumn
            | FailureReason::QueryError
            | FailureReason::NotOneColumn => false,
            // The same snapshot time of the same table fails the same way;
            // a later scheduled run (a later snapshot time) or a spec
            // change can succeed.
            FailureReason::SnapshotBeforeHistory | FailureReason::UnsupportedSource => false,
            // The same task with the same operator settings fails the same
            // way: a retry cannot fix it, an operator upgrade or a fixed
            // setting can.
            FailureReason::BadTask => false,
            // The same data in the same memory limit runs out again; a
            // higher limit in the spec (a spec change) fixes it.
            FailureReason::OutOfMemory => false,
            // The same Job is refused again until the spec changes.
            FailureReason::JobRejected => false,
            // The lake, the store, the node or a referenced segment may
            // recover.
            FailureReason::SegmentNotReady
            | FailureReason::UnreadableSource
            | FailureReason::ResourcesExhausted
            | FailureReason::WriteFailed
            | FailureReason::NoResult
            | FailureReason::CorruptResult
            | FailureReason::StoreUnavailable
            | FailureReason::WorkerFailed
            | FailureReason::IngestIncomplete
            | FailureReason::DeadlineExceeded
            | FailureReason::BackoffLimitExceeded
            | FailureReason::JobFailed
            // The node, the registry, the cluster's capacity or a missing
            // object may be fixed without touching the Segment.
            | FailureReason::PodFailed
            | FailureReason::ImagePullFailed
            | FailureReason::Unschedulable
            | FailureReason::ContainerConfigError
            | FailureReason::PodNotCreated => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_reads_back_from_its_name() {
        for reason in FailureReason::ALL {
            assert_eq!(reason.as_str().parse::<FailureReason>(), Ok(*reason));
        }
        for reason in EventReason::ALL {
            assert_eq!(reason.to_string().parse::<EventReason>(), Ok(*reason));
        }
        for reason in HoldReason::ALL {
            assert_eq!(reason.as_str().parse::<HoldReason>(), Ok(*reason));
        }
        assert_eq!("Ready".parse::<ConditionType>(), Ok(ConditionType::Ready));
        assert_eq!("ready".parse::<ConditionType>(), Err(UnknownReason("ready".into())));
    }

    #[test]
    fn spec_problems_are_warned_about_under_their_own_name() {
        for problem in SpecProblem::ALL {
            let reason = EventReason::from(*problem);
            assert_eq!(reason.as_str(), problem.as_str());
            assert!(reason.is_warning(), "{reason}");
        }
    }
}
