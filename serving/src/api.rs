//! Routes, their request and response types, and the OpenAPI document
//! generated from them.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use segment_core::api::SegmentKey;
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Access;
use crate::error::{ApiError, ErrorBody};
use crate::state::{ActiveSegment, AppState};
use crate::MAX_USER_LEN;

/// Kubernetes names are at most 253 bytes; anything longer cannot name a segment.
const MAX_NAME_LEN: usize = 253;

/// The longest request body read: enough for `max_checks` checks of the
/// longest names and user ids, JSON-escaped, and no more, so a client
/// cannot make a replica buffer megabytes it will refuse anyway.
pub fn max_body_bytes(max_checks: usize) -> usize {
    const PER_CHECK: usize = 2 * (2 * MAX_NAME_LEN + MAX_USER_LEN) + 64;
    1024 + max_checks * PER_CHECK
}

#[derive(OpenApi)]
#[openapi(
    info(title = "segment-serving", description = "Customer segment membership, served from the segment store."),
    modifiers(&BearerAuth),
    tags(
        (name = "membership", description = "Which segments a user is in"),
        (name = "segments", description = "Active and retained versions"),
        (name = "operations", description = "Probes and this document"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    }
}

/// One segment a user is in. The users route renders each active segment's
/// entry once (see [`user_segment_json`]), borrowing the names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UserSegment<'a> {
    #[schema(value_type = String)]
    pub namespace: Cow<'a, str>,
    #[schema(value_type = String)]
    pub name: Cow<'a, str>,
    /// The active version the user is a member of.
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UserSegments<'a> {
    #[schema(value_type = String)]
    pub user: Cow<'a, str>,
    pub segments: Vec<UserSegment<'a>>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UserQuery {
    /// Only segments of this namespace.
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Membership {
    pub member: bool,
    /// The active version the answer is about.
    pub version: u64,
}

/// One (namespace, segment, user) triple to check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Check {
    pub namespace: String,
    pub segment: String,
    pub user: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CheckRequest {
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CheckResult {
    pub namespace: String,
    pub segment: String,
    pub user: String,
    pub member: bool,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CheckResponse {
    /// In the order of the request's checks.
    pub results: Vec<CheckResult>,
}

/// A sealed version the store holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    pub version: u64,
    pub members: u64,
    pub active: bool,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition_hash: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SegmentInfo {
    pub namespace: String,
    pub name: String,
    /// What readers see; absent while no version is active.
    pub active_version: Option<u64>,
    /// Retained versions, oldest first.
    pub versions: Vec<VersionInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SegmentList {
    pub namespace: String,
    /// Segments with an active version, by name.
    pub segments: Vec<SegmentInfo>,
}

fn check_user(field: &str, user: &str) -> Result<(), ApiError> {
    if user.is_empty() {
        Err(ApiError::invalid(field, format!("{field}: a user id must not be empty")))
    } else if user.len() > MAX_USER_LEN {
        Err(ApiError::invalid(field, format!("{field}: a user id is at most {MAX_USER_LEN} bytes, this one has {}", user.len())))
    } else {
        Ok(())
    }
}

/// A user held by another shard is refused (`421 WrongShard`), never
/// answered "in no segment".
fn check_shard(state: &AppState, field: &str, user: &str) -> Result<(), ApiError> {
    if state.owns(user) {
        return Ok(());
    }
    let shard = state.config().index.shard;
    Err(ApiError::wrong_shard(field, crate::Shard::of(user, shard.count), shard))
}

fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        Err(ApiError::invalid(field, format!("{field} must not be empty")))
    } else if name.len() > MAX_NAME_LEN {
        Err(ApiError::invalid(field, format!("{field} is at most {MAX_NAME_LEN} bytes")))
    } else {
        Ok(())
    }
}

fn no_active_version(field: Option<&str>, segment: &SegmentKey) -> ApiError {
    ApiError::not_found(field, format!("segment {segment} is unknown or has no active version"))
}

/// Active segments of a user.
#[utoipa::path(
    get,
    path = "/v1/users/{user}/segments",
    tag = "membership",
    params(("user" = String, Path, description = "User id, 1 to 256 bytes"), UserQuery),
    responses(
        (status = 200, description = "The user's active segments (empty when none)", body = UserSegments),
        (status = 400, description = "Bad user id or namespace", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Namespace not allowed for this token", body = ErrorBody),
        (status = 421, description = "The user is held by another shard (route by FNV-1a 64 of the user id)", body = ErrorBody),
        (status = 503, description = "This replica is not ready, or the store lost its state", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn user_segments(
    access: Access,
    State(state): State<AppState>,
    Path(user): Path<String>,
    Query(query): Query<UserQuery>,
) -> Result<Response, ApiError> {
    check_user("user", &user)?;
    check_shard(&state, "user", &user)?;
    if let Some(namespace) = &query.namespace {
        check_name("namespace", namespace)?;
        access.check("namespace", namespace)?;
    }
    let active = state.user_segments(&user).map_err(|e| ApiError::store(&e))?;
    let segments = active
        .iter()
        .filter(|a| query.namespace.as_ref().is_none_or(|ns| *ns == a.segment.namespace))
        .filter(|a| access.allows(&a.segment.namespace));
    Ok(user_segments_json(&user, segments))
}

/// One segment of the users route's answer in JSON, rendered when its
/// version becomes active (see [`ActiveSegment`]).
pub(crate) fn user_segment_json(segment: &SegmentKey, version: u64) -> Box<str> {
    let entry = UserSegment { namespace: Cow::Borrowed(&segment.namespace), name: Cow::Borrowed(&segment.name), version };
    serde_json::to_string(&entry).expect("a UserSegment serializes").into_boxed_str()
}

/// The users route's answer: [`UserSegments`] as serde writes it, put
/// together from the segments' pre-rendered JSON.
fn user_segments_json<'a>(user: &str, segments: impl Iterator<Item = &'a Arc<ActiveSegment>>) -> Response {
    let mut body = Vec::with_capacity(256);
    body.extend_from_slice(br#"{"user":"#);
    serde_json::to_writer(&mut body, user).expect("a string serializes");
    body.extend_from_slice(br#","segments":["#);
    for (i, segment) in segments.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(segment.json.as_bytes());
    }
    body.extend_from_slice(b"]}");
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

/// Whether a user is in the active version of a segment.
#[utoipa::path(
    get,
    path = "/v1/namespaces/{namespace}/segments/{name}/members/{user}",
    tag = "membership",
    params(
        ("namespace" = String, Path, description = "Namespace of the Segment"),
        ("name" = String, Path, description = "Name of the Segment"),
        ("user" = String, Path, description = "User id, 1 to 256 bytes"),
    ),
    responses(
        (status = 200, description = "Membership in the active version", body = Membership),
        (status = 400, description = "Bad user id or name", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Namespace not allowed for this token", body = ErrorBody),
        (status = 404, description = "Segment unknown or without an active version", body = ErrorBody),
        (status = 421, description = "The user is held by another shard (route by FNV-1a 64 of the user id)", body = ErrorBody),
        (status = 503, description = "This replica is not ready, or the store lost its state", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn member(
    access: Access,
    State(state): State<AppState>,
    Path((namespace, name, user)): Path<(String, String, String)>,
) -> Result<Json<Membership>, ApiError> {
    check_name("namespace", &namespace)?;
    check_name("name", &name)?;
    check_user("user", &user)?;
    check_shard(&state, "user", &user)?;
    access.check("namespace", &namespace)?;
    let segment = SegmentKey::new(namespace, name);
    let active = state.active(&segment).ok_or_else(|| no_active_version(Some("name"), &segment))?;
    let version = active.version;
    let answers = state.members(&[(active, user.as_str())]).map_err(|e| ApiError::store(&e))?;
    Ok(Json(Membership { member: answers.first().copied().unwrap_or(false), version }))
}

/// Many membership checks at once.
#[utoipa::path(
    post,
    path = "/v1/membership:check",
    tag = "membership",
    request_body = CheckRequest,
    responses(
        (status = 200, description = "One result per check, in order", body = CheckResponse),
        (status = 400, description = "Malformed body, bad field or too many checks", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "A namespace not allowed for this token", body = ErrorBody),
        (status = 404, description = "A segment unknown or without an active version", body = ErrorBody),
        (status = 413, description = "A body longer than the most checks allowed can take", body = ErrorBody),
        (status = 421, description = "A user held by another shard (route by FNV-1a 64 of the user id)", body = ErrorBody),
        (status = 503, description = "This replica is not ready, or the store lost its state", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn check(
    access: Access,
    State(state): State<AppState>,
    body: Result<Json<CheckRequest>, JsonRejection>,
) -> Result<Json<CheckResponse>, ApiError> {
    let max = state.config().max_checks;
    let Json(request) = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(max_body_bytes(max)),
        _ => ApiError::invalid("body", format!("body: {}", e.body_text())),
    })?;
    if request.checks.len() > max {
        return Err(ApiError::invalid("checks", format!("checks: at most {max} per request, got {}", request.checks.len())));
    }
    let aliases = state.aliases();
    let mut asked: Vec<(Arc<ActiveSegment>, &str)> = Vec::with_capacity(request.checks.len());
    for (i, c) in request.checks.iter().enumerate() {
        let field = |name: &str| format!("checks[{i}].{name}");
        check_name(&field("namespace"), &c.namespace)?;
        check_name(&field("segment"), &c.segment)?;
        check_user(&field("user"), &c.user)?;
        check_shard(&state, &field("user"), &c.user)?;
        access.check(&field("namespace"), &c.namespace)?;
        let segment = SegmentKey::new(c.namespace.clone(), c.segment.clone());
        let active = aliases.get(&segment).ok_or_else(|| no_active_version(Some(&field("segment")), &segment))?;
        asked.push((active.clone(), c.user.as_str()));
    }
    let answers = state.members(&asked).map_err(|e| ApiError::store(&e))?;
    let versions: Vec<u64> = asked.iter().map(|(active, _)| active.version).collect();
    drop(asked);
    let results = request
        .checks
        .into_iter()
        .zip(versions.into_iter().zip(answers))
        .map(|(c, (version, member))| CheckResult { namespace: c.namespace, segment: c.segment, user: c.user, member, version })
        .collect();
    Ok(Json(CheckResponse { results }))
}

async fn segment_info(state: &AppState, segment: SegmentKey, active: Option<u64>) -> Result<SegmentInfo, ApiError> {
    let versions = state.versions(&segment).await.map_err(|e| ApiError::store(&e))?;
    let versions = versions
        .iter()
        .map(|(version, stored)| VersionInfo {
            version: *version,
            members: stored.members,
            active: active == Some(*version),
            snapshot_time: stored.snapshot_time.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            definition_hash: stored.definition_hash.clone(),
        })
        .collect();
    Ok(SegmentInfo { namespace: segment.namespace, name: segment.name, active_version: active, versions })
}

/// Segments of a namespace that have an active version.
#[utoipa::path(
    get,
    path = "/v1/namespaces/{namespace}/segments",
    tag = "segments",
    params(("namespace" = String, Path, description = "Namespace of the Segments")),
    responses(
        (status = 200, description = "Active and retained versions with member counts", body = SegmentList),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Namespace not allowed for this token", body = ErrorBody),
        (status = 503, description = "Store unavailable and not in cache", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn list_segments(
    access: Access,
    State(state): State<AppState>,
    Path(namespace): Path<String>,
) -> Result<Json<SegmentList>, ApiError> {
    check_name("namespace", &namespace)?;
    access.check("namespace", &namespace)?;
    let aliases = state.aliases();
    let mut listed: Vec<_> = aliases.values().filter(|active| active.segment.namespace == namespace).collect();
    listed.sort_by(|a, b| a.segment.name.cmp(&b.segment.name));
    let infos = listed.into_iter().map(|active| segment_info(&state, active.segment.clone(), Some(active.version)));
    let segments = futures::future::try_join_all(infos).await?;
    Ok(Json(SegmentList { namespace, segments }))
}

/// One segment: its active version and the retained ones.
#[utoipa::path(
    get,
    path = "/v1/namespaces/{namespace}/segments/{name}",
    tag = "segments",
    params(
        ("namespace" = String, Path, description = "Namespace of the Segment"),
        ("name" = String, Path, description = "Name of the Segment"),
    ),
    responses(
        (status = 200, description = "Active and retained versions with member counts", body = SegmentInfo),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Namespace not allowed for this token", body = ErrorBody),
        (status = 404, description = "The store holds nothing for this segment", body = ErrorBody),
        (status = 503, description = "Store unavailable and not in cache", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn get_segment(
    access: Access,
    State(state): State<AppState>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<SegmentInfo>, ApiError> {
    check_name("namespace", &namespace)?;
    check_name("name", &name)?;
    access.check("namespace", &namespace)?;
    let segment = SegmentKey::new(namespace, name);
    let active = state.active_version(&segment);
    let info = segment_info(&state, segment.clone(), active).await?;
    if info.active_version.is_none() && info.versions.is_empty() {
        return Err(ApiError::not_found(Some("name"), format!("segment {segment} is unknown")));
    }
    Ok(Json(info))
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Alive", body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the alias map was loaded at least once.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = String),
        (status = 503, description = "The alias map was never loaded", body = String),
    )
)]
async fn readyz(State(state): State<AppState>) -> Response {
    if state.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: the alias map has not been loaded from the store yet").into_response()
    }
}

/// Prometheus metrics (OpenMetrics text), on the metrics port only
/// ([`metrics_router`]).
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics().encode())
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "OpenAPI document")))]
async fn openapi_json() -> impl IntoResponse {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let document = DOCUMENT.get_or_init(|| openapi().to_json().unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")));
    ([(header::CONTENT_TYPE, "application/json")], document.as_str())
}

async fn unmatched() -> ApiError {
    ApiError::not_found(None, "no such route; see /openapi.json")
}

/// Records every request by route template (not the raw path, which
/// would make a label per user) and status code. A plain tower layer
/// rather than `middleware::from_fn`, which boxes a future and clones the
/// state on every request.
#[derive(Clone)]
struct Track<S> {
    inner: S,
    state: AppState,
}

/// The layer that wraps each route in [`Track`].
#[derive(Clone)]
struct TrackRequests(AppState);

impl<S> tower::Layer<S> for TrackRequests {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track { inner, state: self.0.clone() }
    }
}

impl<S> tower::Service<Request> for Track<S>
where
    S: tower::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Tracked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Tracked<S::Future> {
        let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |r| route_label(r.as_str()));
        let method = method_label(request.method());
        Tracked { response: self.inner.call(request), state: self.state.clone(), route, method, started: Instant::now() }
    }
}

pin_project_lite::pin_project! {
    struct Tracked<F> {
        #[pin]
        response: F,
        state: AppState,
        route: &'static str,
        method: &'static str,
        started: Instant,
    }
}

impl<F, E> Future for Tracked<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.response.poll(cx));
        if let Ok(response) = &result {
            let seconds = this.started.elapsed().as_secs_f64();
            this.state.metrics().request(this.route, this.method, response.status().as_u16(), seconds);
        }
        Poll::Ready(result)
    }
}

/// The route template as a `'static` label, so counting a request
/// allocates nothing: the templates are the OpenAPI document's paths,
/// which `routes!` ties to the router.
fn route_label(template: &str) -> &'static str {
    static TEMPLATES: OnceLock<Vec<&'static str>> = OnceLock::new();
    let templates = TEMPLATES.get_or_init(|| openapi().paths.paths.into_keys().map(|p| &*p.leak()).collect());
    templates.iter().copied().find(|t| *t == template).unwrap_or("other")
}

/// The method as a label without allocating per request; the API uses
/// only GET and POST, anything else is counted together.
fn method_label(method: &axum::http::Method) -> &'static str {
    match *method {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::HEAD => "HEAD",
        _ => "OTHER",
    }
}

/// The routes, each paired with its OpenAPI operation by `routes!`, so the
/// document cannot drift from what is served: the `/v1` API, the
/// operational routes, and the document of both.
fn parts() -> (Router<AppState>, Router<AppState>, utoipa::openapi::OpenApi) {
    let (api, mut document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(user_segments))
        .routes(routes!(member))
        .routes(routes!(check))
        .routes(routes!(list_segments))
        .routes(routes!(get_segment))
        .split_for_parts();
    let (operations, operations_document) =
        OpenApiRouter::new().routes(routes!(healthz)).routes(routes!(readyz)).routes(routes!(openapi_json)).split_for_parts();
    document.merge(operations_document);
    (api, operations, document)
}

/// The OpenAPI document of every route [`router`] serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    parts().2
}

/// The serving API over `state`: `/v1/...` (behind bearer auth when
/// tokens are configured: every `/v1` handler takes an [`Access`]),
/// `/openapi.json`, `/healthz`, `/readyz`.
pub fn router(state: AppState) -> Router {
    let (api, operations, _) = parts();
    let body_limit = DefaultBodyLimit::max(max_body_bytes(state.config().max_checks));
    api.merge(operations).route_layer(TrackRequests(state.clone())).layer(body_limit).fallback(unmatched).with_state(state)
}

/// `/metrics` over `state`, served on a port of its own so that a network
/// policy can let scrapers reach the metrics without reaching the API, and
/// API clients the API without the metrics.
pub fn metrics_router(state: AppState) -> Router {
    Router::new().route("/metrics", axum::routing::get(metrics)).fallback(unmatched).with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The users route writes its answer by hand from pre-rendered parts;
    /// it must be byte for byte what serde writes for the documented type.
    #[tokio::test]
    async fn the_users_answer_is_what_serde_writes_for_user_segments() {
        let segments = [SegmentKey::new("growth", "active-buyers"), SegmentKey::new("risk", "chargebacks")];
        let nobody = || segment_core::index::IdSet::open(segment_core::index::build([]).unwrap()).unwrap();
        let active: Vec<Arc<ActiveSegment>> = segments
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let version = crate::indexes::LoadedVersion::new(7 + i as u64 * 1000, nobody(), None);
                Arc::new(ActiveSegment::new(s.clone(), Arc::new(version)))
            })
            .collect();
        for (user, shown) in [("u-1", 2), ("quote\"back\\slash\u{1}é\u{2028}", 2), ("nobody", 0)] {
            let response = user_segments_json(user, active.iter().take(shown));
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
            let expected = UserSegments {
                user: Cow::Borrowed(user),
                segments: active
                    .iter()
                    .take(shown)
                    .map(|a| UserSegment {
                        namespace: Cow::Borrowed(&a.segment.namespace),
                        name: Cow::Borrowed(&a.segment.name),
                        version: a.version,
                    })
                    .collect(),
            };
            assert_eq!(String::from_utf8_lossy(&body), serde_json::to_string(&expected).unwrap(), "user {user:?}");
        }
    }
}
