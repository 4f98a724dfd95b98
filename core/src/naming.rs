//! Names of the objects the operator creates, and where results live.
//! Deterministic, so a restarted operator finds what it created before.

use sha2::{Digest, Sha256};

use crate::api::SegmentKey;

/// Longest Job name: Jobs copy their name into the `job-name` label, and
/// label values stop at 63 characters.
pub const MAX_JOB_NAME: usize = 63;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobKind {
    Compute,
    Ingest,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Compute => "compute",
            JobKind::Ingest => "ingest",
        }
    }

    pub fn parse(text: &str) -> Option<JobKind> {
        match text {
            "compute" => Some(JobKind::Compute),
            "ingest" => Some(JobKind::Ingest),
            _ => None,
        }
    }
}

/// `<segment>-v<version>-<kind>`; past 63 characters the segment name is
/// cut and a hash of the whole name keeps it unique.
pub fn job_name(segment: &str, version: u64, kind: JobKind) -> String {
    let suffix = format!("-v{version}-{}", kind.as_str());
    let full = format!("{segment}{suffix}");
    if full.len() <= MAX_JOB_NAME {
        return full;
    }
    let hash = short_hash(segment);
    let room = MAX_JOB_NAME - suffix.len() - hash.len() - 1;
    let head = segment[..room.min(segment.len())].trim_end_matches('-');
    format!("{head}-{hash}{suffix}")
}

/// The name of a run's Job of `kind`. A compute Job runs in the
/// Segment's namespace: `<segment>-v<N>-compute`. An ingest Job may run in
/// the operator's ingest namespace, shared by every tenant, so its name
/// carries the namespace and a hash of the whole key (`growth-vip` of
/// namespace `growth` and `growth-vip` of namespace `default` stay apart):
/// `<namespace>-<segment>-<hash>-v<N>-ingest`.
pub fn run_job_name(segment: &SegmentKey, version: u64, kind: JobKind) -> String {
    match kind {
        JobKind::Compute => job_name(&segment.name, version, kind),
        JobKind::Ingest => {
            let qualified = format!("{}-{}-{}", segment.namespace, segment.name, short_hash(&segment.to_string()));
            job_name(&qualified, version, kind)
        }
    }
}

/// The longest label value Kubernetes accepts.
pub const MAX_LABEL_VALUE: usize = 63;

/// The value of the segment label on a Segment's Jobs and pods: its name
/// when that fits a label value, else the name's first characters and a
/// hash of the whole (a Segment's name may have 253 characters; a Job
/// with a longer label value is refused by the API server).
pub fn segment_label_value(segment: &str) -> String {
    if segment.len() <= MAX_LABEL_VALUE {
        return segment.to_string();
    }
    let hash = short_hash(segment);
    // A label value ends with an alphanumeric character.
    let head = segment[..MAX_LABEL_VALUE - hash.len() - 1].trim_end_matches(['-', '.']);
    format!("{head}-{hash}")
}

fn short_hash(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// `<base>/<namespace>/<segment>/v<version>/`: where a version's result
/// parts and `_manifest.json` are written.
pub fn results_uri(base: &str, segment: &SegmentKey, version: u64) -> String {
    format!("{}/{}/{}/v{version}/", base.trim_end_matches('/'), segment.namespace, segment.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_fit_kubernetes_and_stay_apart() {
        assert_eq!(segment_label_value("vip"), "vip");
        let a = format!("{}-a", "x".repeat(70));
        let b = format!("{}-b", "x".repeat(70));
        for value in [segment_label_value(&a), segment_label_value(&b)] {
            assert!(value.len() <= MAX_LABEL_VALUE, "{value}");
            assert!(value.starts_with("xxx") && value.chars().last().unwrap().is_ascii_alphanumeric(), "{value}");
        }
        assert_ne!(segment_label_value(&a), segment_label_value(&b));
        // A cut that would end on '-' or '.' is trimmed.
        let dotted = format!("{}.{}", "y".repeat(53), "z".repeat(20));
        assert!(!segment_label_value(&dotted).contains(".-"));
    }

    #[test]
    fn short_names_are_readable() {
        assert_eq!(job_name("lapsed-high-value", 43, JobKind::Compute), "lapsed-high-value-v43-compute");
        assert_eq!(job_name("a", 1, JobKind::Ingest), "a-v1-ingest");
    }

    #[test]
    fn ingest_job_names_tell_namespaces_apart() {
        let key = |ns: &str, name: &str| SegmentKey::new(ns, name);
        let compute = run_job_name(&key("growth", "vip"), 3, JobKind::Compute);
        assert_eq!(compute, "vip-v3-compute");
        let ingest = run_job_name(&key("growth", "vip"), 3, JobKind::Ingest);
        assert!(ingest.starts_with("growth-vip-") && ingest.ends_with("-v3-ingest"), "{ingest}");
        // The same dashes, split differently between namespace and name.
        assert_ne!(run_job_name(&key("a-b", "c"), 1, JobKind::Ingest), run_job_name(&key("a", "b-c"), 1, JobKind::Ingest));
        let long = run_job_name(&key(&"n".repeat(63), &"s".repeat(253)), 1, JobKind::Ingest);
        assert!(long.len() <= MAX_JOB_NAME, "{long}");
    }

    #[test]
    fn long_names_are_cut_with_a_hash_and_stay_distinct() {
        let a = "x".repeat(60) + "-a";
        let b = "x".repeat(60) + "-b";
        let (na, nb) = (job_name(&a, 12345, JobKind::Compute), job_name(&b, 12345, JobKind::Compute));
        assert!(na.len() <= MAX_JOB_NAME && nb.len() <= MAX_JOB_NAME, "{na} {nb}");
        assert_ne!(na, nb);
        assert!(na.ends_with("-v12345-compute"));
        assert_eq!(na, job_name(&a, 12345, JobKind::Compute));
        // A name that ends with '-' after the cut must not produce '--'.
        let dashy = format!("{}-{}", "y".repeat(42), "z".repeat(30));
        assert!(!job_name(&dashy, 1, JobKind::Ingest).contains("--"));
    }

    #[test]
    fn results_uri_layout() {
        let key = SegmentKey::new("growth", "vip");
        assert_eq!(results_uri("s3://results/", &key, 7), "s3://results/growth/vip/v7/");
    }
}
