//! A stand-in for the Kubernetes API server, behind kube's mock service
//! (the shared [`segment_tests::kube_api`]). It answers the calls the
//! operator makes from a small in-memory world and logs every request, so
//! tests assert the exact requests a reconcile sends, in order.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::StatusCode;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use segment_core::api::{Segment, SegmentSource};
use segment_operator::spark::SparkApplication;
pub use segment_tests::kube_api::Logged;
use segment_tests::kube_api::{self, status};
use serde_json::{json, Value};

#[derive(Default)]
pub struct World {
    pub segment: Option<Segment>,
    pub sources: Vec<SegmentSource>,
    /// Jobs of every namespace.
    pub jobs: Vec<Job>,
    pub pods: Vec<Pod>,
    /// SparkApplications of every namespace.
    pub spark_applications: Vec<SparkApplication>,
    pub leases: BTreeMap<String, Lease>,
    pub log: Vec<Logged>,
    /// Makes the next Lease replace fail with 409, as when another replica
    /// wrote between our read and our write.
    pub conflict_next_lease_write: bool,
    /// Lease calls answer 503, as from an API server that is going away.
    pub lease_calls_fail: bool,
    /// A deleted Job stays (marked for deletion) and the delete answers
    /// with it, as in a foreground deletion whose pods are still stopping.
    pub jobs_linger_on_delete: bool,
    pub next_resource_version: u64,
}

impl World {
    pub fn requests(&self, method: &str, path_part: &str) -> Vec<Logged> {
        self.log.iter().filter(|l| l.method == method && l.path.contains(path_part)).cloned().collect()
    }
}

pub type SharedWorld = Arc<Mutex<World>>;

/// A client whose requests are answered by `world`.
pub fn client(world: SharedWorld) -> Client {
    kube_api::client("default", move |request| {
        let mut world = world.lock().unwrap();
        let reply = answer(&mut world, request);
        world.log.push(request.clone());
        reply
    })
}

/// `labelSelector=a=b,c=d` from a query, as pairs.
fn selector(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|p| p.strip_prefix("labelSelector="))
        .flat_map(|s| s.split(','))
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

fn matches(labels: Option<&BTreeMap<String, String>>, wanted: &[(String, String)]) -> bool {
    wanted.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

fn list(api_version: &str, kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

fn answer(world: &mut World, req: &Logged) -> (StatusCode, Value) {
    let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let wanted = selector(&req.query);
    world.next_resource_version += 1;
    let rv = world.next_resource_version.to_string();
    match (req.method.as_str(), segs.as_slice()) {
        ("GET", ["apis", "batch", "v1", "jobs"]) => {
            let items = world.jobs.iter().filter(|j| matches(j.metadata.labels.as_ref(), &wanted)).map(|j| json!(j)).collect();
            (StatusCode::OK, list("batch/v1", "JobList", items))
        }
        ("GET", ["apis", "batch", "v1", "namespaces", ns, "jobs"]) => {
            let items = world
                .jobs
                .iter()
                .filter(|j| j.metadata.namespace.as_deref() == Some(*ns) && matches(j.metadata.labels.as_ref(), &wanted))
                .map(|j| json!(j))
                .collect();
            (StatusCode::OK, list("batch/v1", "JobList", items))
        }
        ("POST", ["apis", "batch", "v1", "namespaces", _, "jobs"]) => {
            let mut job: Job = serde_json::from_value(req.body.clone()).unwrap();
            if world.jobs.iter().any(|j| j.metadata.name == job.metadata.name) {
                return status(409, "AlreadyExists", "job exists");
            }
            job.metadata.resource_version = Some(rv);
            world.jobs.push(job.clone());
            (StatusCode::CREATED, json!(job))
        }
        ("DELETE", ["apis", "batch", "v1", "namespaces", _, "jobs", name]) if world.jobs_linger_on_delete => {
            let Some(job) = world.jobs.iter_mut().find(|j| j.metadata.name.as_deref() == Some(*name)) else {
                return status(404, "NotFound", "no such job");
            };
            job.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
            (StatusCode::OK, json!(job))
        }
        ("DELETE", ["apis", "batch", "v1", "namespaces", _, "jobs", name]) => {
            let before = world.jobs.len();
            world.jobs.retain(|j| j.metadata.name.as_deref() != Some(*name));
            if before == world.jobs.len() {
                return status(404, "NotFound", "no such job");
            }
            (StatusCode::OK, json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}))
        }
        ("GET", ["apis", "sparkoperator.k8s.io", "v1beta2", "namespaces", _, "sparkapplications"]) => {
            let items = world
                .spark_applications
                .iter()
                .filter(|a| matches(a.metadata.labels.as_ref(), &wanted))
                .map(|a| json!(a))
                .collect();
            (StatusCode::OK, list("sparkoperator.k8s.io/v1beta2", "SparkApplicationList", items))
        }
        ("POST", ["apis", "sparkoperator.k8s.io", "v1beta2", "namespaces", _, "sparkapplications"]) => {
            let mut app: SparkApplication = serde_json::from_value(req.body.clone()).unwrap();
            if world.spark_applications.iter().any(|a| a.metadata.name == app.metadata.name) {
                return status(409, "AlreadyExists", "sparkapplication exists");
            }
            app.metadata.resource_version = Some(rv);
            world.spark_applications.push(app.clone());
            (StatusCode::CREATED, json!(app))
        }
        ("DELETE", ["apis", "sparkoperator.k8s.io", "v1beta2", "namespaces", _, "sparkapplications", name]) => {
            let before = world.spark_applications.len();
            world.spark_applications.retain(|a| a.metadata.name.as_deref() != Some(*name));
            if before == world.spark_applications.len() {
                return status(404, "NotFound", "no such sparkapplication");
            }
            (StatusCode::OK, json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}))
        }
        ("GET", ["api", "v1", "namespaces", _, "pods"]) => {
            // A field selector names one pod (a Spark driver's).
            let named = req.query.split('&').find_map(|p| p.strip_prefix("fieldSelector=metadata.name="));
            let items = world
                .pods
                .iter()
                .filter(|p| matches(p.metadata.labels.as_ref(), &wanted))
                .filter(|p| named.is_none_or(|name| p.metadata.name.as_deref() == Some(name)))
                .map(|p| json!(p))
                .collect();
            (StatusCode::OK, list("v1", "PodList", items))
        }
        ("GET", ["apis", "segmentation.dev", "v1alpha1", "namespaces", _, "segmentsources"]) => {
            let items = world.sources.iter().map(|s| json!(s)).collect();
            (StatusCode::OK, list("segmentation.dev/v1alpha1", "SegmentSourceList", items))
        }
        ("PATCH", ["apis", "segmentation.dev", "v1alpha1", "namespaces", _, "segments", _, "status"]) => {
            let segment = world.segment.as_mut().expect("a segment in the world");
            let expected = req.body["metadata"]["resourceVersion"].as_str();
            if expected.is_some() && expected != segment.metadata.resource_version.as_deref() {
                return status(409, "Conflict", "the object has been modified; please apply your changes to the latest version");
            }
            segment.status = Some(serde_json::from_value(req.body["status"].clone()).unwrap());
            segment.metadata.resource_version = Some(rv);
            (StatusCode::OK, json!(segment))
        }
        ("PATCH", ["apis", "segmentation.dev", "v1alpha1", "namespaces", _, "segments", _]) => {
            // The finalizer's JSON patches: add the list, or remove one entry.
            let segment = world.segment.as_mut().expect("a segment in the world");
            for op in req.body.as_array().into_iter().flatten() {
                match (op["op"].as_str(), op["path"].as_str()) {
                    (Some("add"), Some("/metadata/finalizers")) => {
                        segment.metadata.finalizers = serde_json::from_value(op["value"].clone()).unwrap();
                    }
                    (Some("remove"), Some(path)) if path.starts_with("/metadata/finalizers/") => {
                        let i: usize = path.rsplit('/').next().unwrap().parse().unwrap();
                        segment.metadata.finalizers.as_mut().unwrap().remove(i);
                    }
                    _ => {}
                }
            }
            (StatusCode::OK, json!(segment))
        }
        ("POST", ["apis", "events.k8s.io", "v1", "namespaces", _, "events"]) => (StatusCode::CREATED, req.body.clone()),
        (_, ["apis", "coordination.k8s.io", ..]) if world.lease_calls_fail => status(503, "ServiceUnavailable", "unavailable"),
        ("GET", ["apis", "coordination.k8s.io", "v1", "namespaces", _, "leases", name]) => match world.leases.get(*name) {
            Some(lease) => (StatusCode::OK, json!(lease)),
            None => status(404, "NotFound", "no such lease"),
        },
        ("POST", ["apis", "coordination.k8s.io", "v1", "namespaces", _, "leases"]) => {
            let mut lease: Lease = serde_json::from_value(req.body.clone()).unwrap();
            let name = lease.metadata.name.clone().unwrap();
            if world.leases.contains_key(&name) {
                return status(409, "AlreadyExists", "lease exists");
            }
            lease.metadata.resource_version = Some(rv);
            world.leases.insert(name, lease.clone());
            (StatusCode::CREATED, json!(lease))
        }
        ("PUT", ["apis", "coordination.k8s.io", "v1", "namespaces", _, "leases", name]) => {
            let mut lease: Lease = serde_json::from_value(req.body.clone()).unwrap();
            let stored = world.leases.get(*name).and_then(|l| l.metadata.resource_version.clone());
            if std::mem::take(&mut world.conflict_next_lease_write) || stored != lease.metadata.resource_version {
                return status(409, "Conflict", "the object has been modified");
            }
            lease.metadata.resource_version = Some(rv);
            world.leases.insert(name.to_string(), lease.clone());
            (StatusCode::OK, json!(lease))
        }
        _ => status(404, "NotFound", &format!("the fake API does not serve {} {}", req.method, req.path)),
    }
}
