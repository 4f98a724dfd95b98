//! Wires the reconciler into a kube-runtime Controller that watches
//! Segments, the Jobs they own and the SegmentSources they read.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::client::ClientBuilder;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{predicates, reflector, watcher, PredicateConfig, WatchStreamExt};
use kube::{Client, ResourceExt};
use segment_core::api::{ComputeClass, Segment, SegmentSource, SEGMENT_LABEL};
use segment_core::planner::PlannerConfig;
use segment_store::redis::{RedisStore, RedisStoreOptions};
use segment_store::results::ObjectResults;
use tracing::{info, warn};

use crate::api_requests::{counting_layer, RequestCounter};
use crate::config::RunArgs;
use crate::events::EventPublisher;
use crate::http::Health;
use crate::jobs;
use crate::leader::{Leadership, LeaseLock, TermEnd};
use crate::metrics::Metrics;
use crate::reconcile::{self, ClusterCache, ComputeSlots, Context};
use crate::spark::{self, SparkApplication};

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the operator until SIGTERM/SIGINT: campaigns for the lease, leads
/// until it stops or loses the lease, and campaigns again after a loss.
pub async fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    args.check()?;
    let identity = args.leader.identity();
    let timing = args.leader.timing()?;
    let metrics = Arc::new(Metrics::default());
    let request_timeout = Duration::from_secs(args.kube_request_timeout_seconds);
    let clients = Clients::new(&identity, request_timeout, metrics.kube_requests.clone()).await?;
    let client = clients.requests.clone();
    let health = Health { metrics: metrics.clone(), ready: Default::default() };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        segment_runtime::shutdown_signal().await;
        info!("stopping: finishing reconciles in flight");
        let _ = stop_tx.send(true);
    });
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|e| format!("--metrics-addr {}: {e}", args.metrics_addr))?;
    let http_task = tokio::spawn(segment_runtime::probes::serve(listener, Arc::new(health.clone()), stopped(stop_rx.clone())));
    client.apiserver_version().await?;
    health.ready.store(true, Ordering::Relaxed);

    let store_timeout = Duration::from_millis(args.store_timeout_ms);
    let store_options =
        RedisStoreOptions { read_timeout: Some(store_timeout), write_timeout: store_timeout, ..Default::default() };
    let store = Arc::new(RedisStore::connect_with(&args.redis_url, store_options).await?);
    let leadership = if args.leader.leader_election { Leadership::none() } else { Leadership::always() };
    let results = Arc::new(ObjectResults::new(args.results_uri.clone()));
    let events = Arc::new(EventPublisher::new(client.clone(), "segment-operator", &identity));
    // Each term gets fresh watch caches and a fresh context over them.
    let context = |cache: ClusterCache| {
        Arc::new(Context {
            client: client.clone(),
            cache,
            store: store.clone(),
            replicas: store.clone(),
            replica_load_timeout: chrono::Duration::seconds(args.replica_load_timeout_seconds.into()),
            // Per term: a new leader waits again from zero (see ReplicaWaits).
            replica_waits: Default::default(),
            results: results.clone(),
            planner: PlannerConfig {
                results_base: Some(args.results_uri.clone()),
                pod_start_timeout: chrono::Duration::seconds(args.jobs.pod_start_timeout_seconds),
                reader_grace: chrono::Duration::seconds(args.reader_grace_seconds),
                ..Default::default()
            },
            jobs: args.jobs.clone(),
            results_base: args.results_uri.clone(),
            slots: ComputeSlots::new(args.max_concurrent_computes),
            events: events.clone(),
            metrics: metrics.clone(),
            clock: Arc::new(chrono::Utc::now),
            leadership: leadership.clone(),
            rejected_jobs: Default::default(),
        })
    };
    let grace = Duration::from_secs(args.shutdown_grace_seconds);
    let lead = || {
        tokio::spawn(remove_former_layout(store.clone()));
        within_grace(controller(&clients.watches, context, &args, stopped(stop_rx.clone())), stop_rx.clone(), grace)
    };

    if args.leader.leader_election {
        let lock = LeaseLock::new(client.clone(), &args.leader.lease_namespace, &args.leader.lease_name, &identity, timing);
        loop {
            tokio::select! {
                _ = lock.acquire(&leadership) => {}
                _ = stopped(stop_rx.clone()) => break,
            }
            metrics.leader.set(1);
            let end = lock.lead(&leadership, lead()).await;
            metrics.leader.set(0);
            match end {
                TermEnd::Finished => break,
                // The controller of the lost term was dropped; a new one,
                // with fresh caches, starts once the lease is ours again.
                TermEnd::Lost => metrics.leadership_lost.inc(),
            };
        }
    } else {
        lead().await;
    }
    let _ = http_task.await;
    info!("stopped");
    Ok(())
}

/// The two API clients: requests have a read timeout, so a server that
/// stops answering fails the reconcile instead of hanging it; watches have
/// none (a quiet watch is not a dead one) and end on the server's own
/// timeout. Both name the replica in their User-Agent, which the API
/// server's audit log records.
pub struct Clients {
    pub requests: Client,
    pub watches: Client,
}

impl Clients {
    /// Both clients count what they send in `counter`.
    pub async fn new(identity: &str, request_timeout: Duration, counter: RequestCounter) -> Result<Clients, kube::Error> {
        let config = kube::Config::infer().await.map_err(kube::Error::InferConfig)?;
        let (requests, watches) = Clients::configs(config, identity, request_timeout);
        let client = |config: kube::Config| -> Result<Client, kube::Error> {
            Ok(ClientBuilder::try_from(config)?.with_layer(&counting_layer(counter.clone())).build())
        };
        Ok(Clients { requests: client(requests)?, watches: client(watches)? })
    }

    /// The configurations of the request client and of the watch client.
    pub fn configs(mut config: kube::Config, identity: &str, request_timeout: Duration) -> (kube::Config, kube::Config) {
        let agent = format!("segment-operator/{} ({identity})", env!("CARGO_PKG_VERSION"));
        if let Ok(value) = http::HeaderValue::from_str(&agent) {
            config.headers.push((http::header::USER_AGENT, value));
        }
        config.connect_timeout = Some(Duration::from_secs(10).min(request_timeout));
        config.write_timeout = Some(request_timeout);
        let watches = config.clone();
        config.read_timeout = Some(request_timeout);
        // The timeout counts from the request, not from when a pooled
        // connection went idle.
        config.reset_reader_on_write = true;
        (config, watches)
    }
}

/// Removes what the former per-membership Redis layout left
/// (`RedisStore::remove_former_layout`), once a term: after an upgrade from
/// it, the first leader reclaims that memory; later terms find nothing. A
/// failure is logged and the next term tries again; nothing reads those
/// keys, so nothing waits for it.
async fn remove_former_layout(store: Arc<RedisStore>) {
    match store.remove_former_layout().await {
        Ok(0) => {}
        Ok(removed) => info!(removed, "removed the keys of the former per-membership Redis layout"),
        Err(e) => {
            warn!(error = %e, "removing the keys of the former per-membership Redis layout failed; the next term tries again")
        }
    }
}

/// The controller of one term as leader: it watches Segments, the Jobs
/// they own and the SegmentSources they read, and ends once `stop` fires
/// and the reconciles in flight have finished.
fn controller(
    watch_client: &Client,
    context: impl FnOnce(ClusterCache) -> Arc<Context>,
    args: &RunArgs,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) -> impl Future<Output = ()> {
    let namespace = args.namespace.as_deref();
    let (segments_cache, segments_writer) = reflector::store();
    let (jobs_cache, jobs_writer) = reflector::store();
    let (sources_cache, sources_writer) = reflector::store();
    let (namespaces_cache, namespaces_writer) = reflector::store();
    let (classes_cache, classes_writer) = reflector::store();
    let segments = segment_events(watch_client, namespace).reflect(segments_writer).applied_objects();
    let jobs = watcher(api::<Job>(watch_client, namespace), watcher::Config::default().labels(SEGMENT_LABEL))
        .default_backoff()
        .modify(jobs::trim_for_cache)
        .reflect(jobs_writer)
        .touched_objects();
    let sources = watcher(api::<SegmentSource>(watch_client, namespace), watcher::Config::default())
        .default_backoff()
        .reflect(sources_writer)
        .touched_objects();
    // Namespaces (for their compute-class label) and ComputeClasses are
    // cluster-wide even when one namespace is watched: both are the admin's.
    let namespaces_api: Api<Namespace> = Api::all(watch_client.clone());
    let classes_api: Api<ComputeClass> = Api::all(watch_client.clone());
    let namespaces = watcher(namespaces_api, watcher::Config::default())
        .default_backoff()
        .modify(|namespace: &mut Namespace| {
            namespace.metadata.managed_fields = None;
            namespace.metadata.annotations = None;
            namespace.spec = None;
            namespace.status = None;
        })
        .reflect(namespaces_writer)
        .touched_objects()
        // Only a label can change a namespace's class.
        .predicate_filter(predicates::labels, PredicateConfig::default());
    let classes = watcher(classes_api, watcher::Config::default()).default_backoff().reflect(classes_writer).touched_objects();
    // SparkApplications only when Spark runs here: without the Spark
    // operator's CRD the watch would fail forever.
    let (spark_cache, spark_applications) = match args.spark_applications {
        true => {
            let (cache, writer) = reflector::store();
            let stream =
                watcher(api::<SparkApplication>(watch_client, namespace), watcher::Config::default().labels(SEGMENT_LABEL))
                    .default_backoff()
                    .modify(spark::trim_for_cache)
                    .reflect(writer)
                    .touched_objects();
            (Some(cache), stream.boxed())
        }
        false => (None, futures::stream::pending().boxed()),
    };
    let ctx = context(ClusterCache {
        jobs: jobs_cache,
        sources: sources_cache,
        segments: segments_cache.clone(),
        namespaces: namespaces_cache,
        compute_classes: classes_cache,
        spark_applications: spark_cache,
        unwatched_jobs: Default::default(),
    });
    let default_class = args.jobs.default_compute_class.clone();
    let ingest_namespace = args.jobs.ingest_namespace.clone();
    let (for_jobs, for_sources, for_classes, for_namespaces) =
        (ctx.cache.clone(), ctx.cache.clone(), ctx.cache.clone(), ctx.cache.clone());
    Controller::for_stream(segments, segments_cache)
        .with_config(ControllerConfig::default().concurrency(args.reconcile_concurrency))
        // A Job's Segment is its owner, or, for an ingest Job in the
        // ingest namespace (an owner must share the Job's namespace), the
        // one its labels name.
        .watches_stream(jobs, move |job: Job| for_jobs.segment_of(&job, ingest_namespace.as_deref()))
        // A SparkApplication's Segment is its owner.
        .watches_stream(spark_applications, |app: SparkApplication| {
            let namespace = app.namespace()?;
            let owner = app.owner_references().iter().find(|o| o.controller == Some(true) && o.kind == "Segment")?;
            Some(ObjectRef::<Segment>::new(&owner.name).within(&namespace))
        })
        // A new or changed SegmentSource can make a definition valid (or
        // invalid): look at every Segment of its namespace again.
        .watches_stream(sources, move |source: SegmentSource| for_sources.segments_in(&source.namespace().unwrap_or_default()))
        // A ComputeClass changed: every Segment of the namespaces that use
        // it is checked against it again and gets its settings.
        .watches_stream(classes, move |class: ComputeClass| {
            let name = class.name_any();
            let uses_class = |segment: &Segment| {
                let class_of = |ns: &str| for_classes.compute_class_name(ns, default_class.as_deref());
                segment.metadata.namespace.as_deref().and_then(class_of).is_some_and(|(used, _)| used == name)
            };
            for_classes.segments.state_filter(uses_class).iter().map(|s| ObjectRef::from(s.as_ref())).collect::<Vec<_>>()
        })
        // A namespace's label may name another class.
        .watches_stream(namespaces, move |namespace: Namespace| for_namespaces.segments_in(&namespace.name_any()))
        .graceful_shutdown_on(stop)
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(segment = %object, "reconciled"),
                // error_policy has logged the reconcile's own failures.
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                Err(e) => warn!(error = %e, "controller error"),
            }
        })
}

/// Runs `work` (which finishes its reconciles in flight once `stop`
/// fires) but gives it at most `grace` after `stop`.
async fn within_grace(work: impl Future<Output = ()>, stop: tokio::sync::watch::Receiver<bool>, grace: Duration) {
    tokio::select! {
        _ = work => {}
        _ = async { stopped(stop).await; tokio::time::sleep(grace).await } => {
            warn!(?grace, "shutdown grace period over: reconciles still in flight are abandoned");
        }
    }
}

/// Resolves once the stop flag is set.
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// The watch of Segments, each object decoded on its own. A typed watch
/// fails its whole list when one stored object does not decode (a value
/// stored before the schema bounded it, an object from another version
/// of the operator), which would stop the operator for every namespace;
/// here that object is logged and left out, and the others go on.
fn segment_events(
    client: &Client,
    namespace: Option<&str>,
) -> impl futures::Stream<Item = Result<watcher::Event<Segment>, watcher::Error>> + Send + 'static {
    let resource = ApiResource::erase::<Segment>(&());
    let api: Api<DynamicObject> = match namespace {
        Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    watcher(api, watcher::Config::default().any_semantic()).default_backoff().try_filter_map(|event| async move {
        let decode = |mut object: DynamicObject| {
            // Never read, and a good part of a cached object's size.
            object.metadata.managed_fields = None;
            let (namespace, name) = (object.namespace().unwrap_or_default(), object.name_any());
            let decoded = serde_json::to_value(&object).and_then(serde_json::from_value::<Segment>);
            decoded.map_err(|error| warn!(%namespace, segment = %name, %error, "Segment does not decode; left out")).ok()
        };
        Ok(match event {
            watcher::Event::Apply(object) => decode(object).map(watcher::Event::Apply),
            watcher::Event::InitApply(object) => decode(object).map(watcher::Event::InitApply),
            watcher::Event::Delete(object) => decode(object).map(watcher::Event::Delete),
            watcher::Event::Init => Some(watcher::Event::Init),
            watcher::Event::InitDone => Some(watcher::Event::InitDone),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_time_out_watches_do_not_and_both_name_the_replica() {
        let config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        let (requests, watches) = Clients::configs(config, "pod-a", Duration::from_secs(30));
        assert_eq!(requests.read_timeout, Some(Duration::from_secs(30)));
        assert!(requests.reset_reader_on_write);
        assert_eq!(watches.read_timeout, None, "a quiet watch is not a dead one");
        for config in [&requests, &watches] {
            assert_eq!(config.connect_timeout, Some(Duration::from_secs(10)));
            assert_eq!(config.write_timeout, Some(Duration::from_secs(30)));
            let agent = config.headers.iter().find(|(name, _)| name == http::header::USER_AGENT).unwrap().1.to_str().unwrap();
            assert!(agent.starts_with("segment-operator/") && agent.ends_with("(pod-a)"), "{agent}");
        }
    }
}
