//! Wires the reconciler into a kube-runtime Controller that watches
//! Segments, the Jobs they own and the SegmentSources they read.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use segment_core::api::{Segment, SegmentSource, SEGMENT_LABEL};
use segment_core::planner::PlannerConfig;
use segment_store::redis::RedisStore;
use segment_store::results::ObjectResults;
use tracing::{error, info, warn};

use crate::config::RunArgs;
use crate::http::Health;
use crate::leader::LeaseLock;
use crate::metrics::Metrics;
use crate::reconcile::{self, ComputeSlots, Context};

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

/// Runs the operator until SIGTERM/SIGINT, or until leadership is lost.
pub async fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let health = Health { metrics: metrics.clone(), ready: Default::default() };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.changed().await;
        }
    };
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|e| format!("--metrics-addr {}: {e}", args.metrics_addr))?;
    let http_task = tokio::spawn(segment_runtime::probes::serve(listener, Arc::new(health.clone()), http_stop));
    client.apiserver_version().await?;
    health.ready.store(true, Ordering::Relaxed);

    let store = RedisStore::connect(&args.redis_url).await?;
    let ctx = Arc::new(Context {
        client: client.clone(),
        store: Arc::new(store),
        results: Arc::new(ObjectResults::new(args.results_uri.clone())),
        planner: PlannerConfig { results_base: Some(args.results_uri.clone()), ..Default::default() },
        jobs: args.jobs.clone(),
        results_base: args.results_uri.clone(),
        slots: ComputeSlots::new(args.max_concurrent_computes, args.namespace.clone()),
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: "segment-operator".into(), instance: Some(args.leader.identity.clone()) },
        ),
        metrics,
        clock: Arc::new(chrono::Utc::now),
    });

    let namespace = args.namespace.as_deref();
    let jobs: Api<Job> = api(&client, namespace);
    let sources: Api<SegmentSource> = api(&client, namespace);
    let (cache, writer) = reflector::store();
    let segments = segment_events(&client, namespace).reflect(writer).applied_objects();
    let controller = Controller::for_stream(segments, cache.clone());
    let controller = controller
        .with_config(ControllerConfig::default().concurrency(args.reconcile_concurrency))
        .owns(jobs, watcher::Config::default().labels(SEGMENT_LABEL))
        // A new or changed SegmentSource can make a definition valid (or
        // invalid): look at every Segment of its namespace again.
        .watches(sources, watcher::Config::default(), move |source: SegmentSource| {
            let namespace = source.namespace();
            cache
                .state()
                .iter()
                .filter(|segment| segment.namespace() == namespace)
                .map(|segment| ObjectRef::from(segment.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown_signal(stop_tx.clone()))
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(segment = %object, "reconciled"),
                // error_policy has logged the reconcile's own failures.
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                Err(e) => warn!(error = %e, "controller error"),
            }
        });

    let outcome = if args.leader.leader_election {
        let lock = LeaseLock::new(
            client.clone(),
            &args.leader.lease_namespace,
            &args.leader.lease_name,
            &args.leader.identity,
            args.leader.lease_duration_seconds,
        );
        let mut stop = stop_rx.clone();
        tokio::select! {
            r = lock.run_as_leader(controller) => r.map_err(|e| e.to_string()),
            _ = stop.changed() => Ok(()),
        }
    } else {
        controller.await;
        Ok(())
    };
    let _ = stop_tx.send(true);
    let _ = http_task.await;
    match outcome {
        Ok(()) => {
            info!("stopped");
            Ok(())
        }
        Err(e) => {
            error!(error = %e, "stopping");
            Err(e.into())
        }
    }
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
        let decode = |object: DynamicObject| {
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

/// Stops the controller on SIGTERM or SIGINT.
async fn shutdown_signal(stop: tokio::sync::watch::Sender<bool>) {
    segment_runtime::shutdown_signal().await;
    info!("finishing reconciles in flight");
    let _ = stop.send(true);
}
