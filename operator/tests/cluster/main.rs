//! The operator against a fake Kubernetes API server (kube's mock service):
//! these tests assert the exact requests the operator sends, and set up
//! situations a real server makes hard to reach (a watch that lags a
//! write, a Lease call that never returns). The same behaviour on the real
//! API server is in `e2e/tests/cluster`.

mod adapter;
mod fake_api;
mod leader;
