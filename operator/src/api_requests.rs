//! Counts the operator's own Kubernetes API requests by verb and
//! resource (`segment_operator_kube_requests_total`), the figure
//! client-go exposes as `rest_client_requests_total`: what the operator
//! costs the API server, at rest and after a restart, without access to
//! the API server's metrics. Counted as each request is sent.

use http::{Method, Request, Uri};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tower::util::MapRequestLayer;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The API server's verb: get, list, watch, create, update, patch,
    /// delete, deletecollection; `other` for non-resource paths.
    pub verb: &'static str,
    /// `jobs`, `segments/status`, `leases`, ...; `other` for paths
    /// outside /api and /apis (`/version`).
    pub resource: String,
}

pub type RequestCounter = Family<RequestLabels, Counter>;

/// A layer for the kube client's service stack that counts every request
/// it sends in `counter`.
pub fn counting_layer<B>(counter: RequestCounter) -> MapRequestLayer<impl Fn(Request<B>) -> Request<B> + Clone> {
    MapRequestLayer::new(move |request: Request<B>| {
        counter.get_or_create(&classify(request.method(), request.uri())).inc();
        request
    })
}

/// The verb and resource the API server would record for a request
/// (`/apis/GROUP/VERSION/namespaces/NS/RESOURCE/NAME/SUBRESOURCE`, with
/// the group and namespace parts optional).
pub fn classify(method: &Method, uri: &Uri) -> RequestLabels {
    let parts: Vec<&str> = uri.path().split('/').filter(|p| !p.is_empty()).collect();
    let rest = match parts.first() {
        Some(&"api") => parts.get(2..),
        Some(&"apis") => parts.get(3..),
        _ => None,
    };
    let Some(mut rest) = rest.filter(|r| !r.is_empty()) else {
        return RequestLabels { verb: "other", resource: "other".into() };
    };
    // namespaces/NS/... is a namespaced resource; namespaces/NS alone is
    // the Namespace object itself.
    if rest[0] == "namespaces" && rest.len() >= 3 {
        rest = &rest[2..];
    }
    let named = rest.len() >= 2;
    let resource = match rest.get(2) {
        Some(subresource) => format!("{}/{subresource}", rest[0]),
        None => rest[0].to_string(),
    };
    let watch = uri.query().is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => "other",
    };
    RequestLabels { verb, resource }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(method: Method, uri: &str) -> (&'static str, String) {
        let labels = classify(&method, &uri.parse().unwrap());
        (labels.verb, labels.resource)
    }

    #[test]
    fn requests_are_named_as_the_api_server_names_them() {
        let cases = [
            (Method::GET, "/apis/batch/v1/jobs?labelSelector=x&watch=true&resourceVersion=5", ("watch", "jobs")),
            (Method::GET, "/apis/batch/v1/jobs?labelSelector=x", ("list", "jobs")),
            (Method::GET, "/apis/batch/v1/namespaces/a/jobs?limit=500", ("list", "jobs")),
            (Method::POST, "/apis/batch/v1/namespaces/a/jobs", ("create", "jobs")),
            (Method::DELETE, "/apis/batch/v1/namespaces/a/jobs/j1?propagationPolicy=Background", ("delete", "jobs")),
            (Method::DELETE, "/apis/batch/v1/namespaces/a/jobs?labelSelector=x", ("deletecollection", "jobs")),
            (
                Method::PATCH,
                "/apis/segmentation.dev/v1alpha1/namespaces/a/segments/s/status?fieldManager=f",
                ("patch", "segments/status"),
            ),
            (Method::PUT, "/apis/coordination.k8s.io/v1/namespaces/a/leases/l", ("update", "leases")),
            (Method::GET, "/apis/coordination.k8s.io/v1/namespaces/a/leases/l", ("get", "leases")),
            (Method::GET, "/api/v1/namespaces/a/pods?labelSelector=job-name%3Dj", ("list", "pods")),
            (Method::POST, "/apis/events.k8s.io/v1/namespaces/a/events", ("create", "events")),
            (Method::GET, "/api/v1/namespaces/a", ("get", "namespaces")),
            (Method::GET, "/api/v1/namespaces", ("list", "namespaces")),
            (Method::GET, "/version", ("other", "other")),
        ];
        for (method, uri, (verb, resource)) in cases {
            assert_eq!(labels(method, uri), (verb, resource.to_string()), "{uri}");
        }
    }

    #[tokio::test]
    async fn the_layer_counts_each_request_it_passes_on() {
        use tower::{Layer, ServiceExt};
        let counter = RequestCounter::default();
        let inner =
            tower::service_fn(|request: Request<()>| async move { Ok::<_, std::convert::Infallible>(request.uri().clone()) });
        let service = counting_layer(counter.clone()).layer(inner);
        for _ in 0..3 {
            let request = Request::patch("/apis/batch/v1/namespaces/a/jobs/j/status").body(()).unwrap();
            let passed = service.clone().oneshot(request).await.unwrap();
            assert_eq!(passed.path(), "/apis/batch/v1/namespaces/a/jobs/j/status");
        }
        let count = |verb, resource: &str| counter.get_or_create(&RequestLabels { verb, resource: resource.into() }).get();
        assert_eq!(count("patch", "jobs/status"), 3);
        assert_eq!(count("get", "jobs/status"), 0);
    }
}
