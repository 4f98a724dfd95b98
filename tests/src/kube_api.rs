//! A stand-in for the Kubernetes API server, behind kube's mock service
//! (tower-test). No API server can run in the test environment, so a test
//! answers each request from a small in-memory world of its own and
//! asserts the exact requests a client sent: method, path, query,
//! content type and body.

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

/// One request as the API server received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Logged {
    pub method: String,
    pub path: String,
    /// The query string, percent-decoded (`labelSelector=a=b`).
    pub query: String,
    /// The `Content-Type` header (`application/merge-patch+json` for a merge patch).
    pub content_type: Option<String>,
    /// The JSON body; `Null` when there is none.
    pub body: Value,
}

impl Logged {
    /// `METHOD path`, the form tests compare sequences in.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// A client whose requests `answer` replies to, one at a time and in
/// order, with a status code and a JSON body. `default_namespace` is what
/// a kube context would give. Needs a Tokio runtime.
pub fn client(default_namespace: &str, mut answer: impl FnMut(&Logged) -> (StatusCode, Value) + Send + 'static) -> Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let logged = Logged {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().map(decode).unwrap_or_default(),
                content_type: parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let (status, reply) = answer(&logged);
            let response = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&reply).unwrap_or_default()))
                .expect("a response from a status and a JSON body");
            send.send_response(response);
        }
    });
    Client::new(service, default_namespace)
}

/// A `Status` reply, as the API server sends with an error code.
pub fn status(code: u16, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "reason": reason, "message": message}),
    )
}

/// Percent-decodes a query string (`+` is a space).
pub fn decode(query: &str) -> String {
    let mut out = Vec::new();
    let bytes = query.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_decoded() {
        assert_eq!(decode("labelSelector=a%3Db%2Cc%3Dd&x=1+2"), "labelSelector=a=b,c=d&x=1 2");
        assert_eq!(decode("fieldManager=kubectl-segment"), "fieldManager=kubectl-segment");
        assert_eq!(decode("a=%E2%9C%93"), "a=✓");
        assert_eq!(decode("trailing%4"), "trailing%4");
    }
}
