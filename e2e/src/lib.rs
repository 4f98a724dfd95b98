//! End-to-end tests live in `tests/`; `cluster.sh` runs the operator on a real cluster.
