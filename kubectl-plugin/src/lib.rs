//! `kubectl segment`: a kubectl plugin for Segments.
//!
//! - [`preview`]: runs definitions locally over a lake with the compute
//!   path the worker Jobs use, no cluster needed;
//! - [`cluster`]: `run`, `approve`, `rollback`, `status` on a Segment in
//!   the cluster, as merge patches of its annotations and spec;
//! - [`connect`]: the kube context, chosen as kubectl chooses it;
//! - [`table`]: `kubectl get`-style columns;
//! - [`cli`]: the command line.
//!
//! The binary only parses the command line and prints what [`execute`]
//! returns.

pub mod cli;
pub mod cluster;
pub mod connect;
pub mod preview;
pub mod table;

use chrono::{DateTime, Utc};

use crate::cli::{Cli, Command};
use crate::cluster::Segments;

/// Why a command failed; the message is what the user reads.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("segment \"{name}\" not found in namespace \"{namespace}\"")]
    NotFound { name: String, namespace: String },
    /// A version the status does not list in the state the command needs.
    #[error("{0}")]
    Version(String),
    /// Manifests or options that preview cannot work with.
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Manifest(#[from] segment_core::manifests::ManifestError),
    #[error("kube config: {0}")]
    Config(String),
    #[error("talking to the cluster: {0}")]
    Kube(#[from] kube::Error),
}

/// What a command prints, and whether it succeeded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub success: bool,
}

impl Output {
    fn ok(stdout: String) -> Output {
        Output { stdout, stderr: String::new(), success: true }
    }
}

/// Runs a parsed command line; `now` is the time annotations record and
/// ages are counted from.
pub async fn execute(cli: Cli, now: DateTime<Utc>) -> Result<Output, PluginError> {
    match &cli.command {
        Command::Preview(args) => preview::run(args, now).await,
        command => {
            let (client, namespace) = connect::client(&cli.kube).await?;
            let segments = Segments::new(client, &namespace);
            cluster_command(command, &segments, now).await.map(Output::ok)
        }
    }
}

/// The commands that act on a Segment in the cluster.
pub async fn cluster_command(command: &Command, segments: &Segments, now: DateTime<Utc>) -> Result<String, PluginError> {
    match command {
        Command::Run { name } => segments.request_run(name, now).await,
        Command::Approve { name, version } => segments.approve(name, *version).await,
        Command::Rollback { name, to_version, clear } => {
            let target = match (to_version, clear) {
                (Some(version), false) => cluster::Rollback::To(*version),
                (None, true) => cluster::Rollback::Clear,
                _ => return Err(PluginError::Input("give either --to-version N or --clear".into())),
            };
            segments.rollback(name, target).await
        }
        Command::Status { name } => segments.status(name, now).await,
        Command::Preview(_) => Err(PluginError::Input("preview does not act on the cluster".into())),
    }
}
