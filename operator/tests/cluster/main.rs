//! The operator against a fake Kubernetes API server (kube's mock service):
//! no API server can run in the test environment, so these tests assert
//! the exact requests the operator sends instead.

mod adapter;
mod fake_api;
mod leader;
