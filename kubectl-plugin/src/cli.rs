//! The command line, as `kubectl segment ...` passes it on.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "kubectl-segment",
    bin_name = "kubectl segment",
    version,
    about = "Preview, run, approve, roll back and inspect Segments (segmentation.dev/v1alpha1)",
    long_about = "Preview, run, approve, roll back and inspect Segments (segmentation.dev/v1alpha1).\n\n\
        Installed on PATH as `kubectl-segment`, it runs as `kubectl segment`. The cluster commands use \
        the current kube context like kubectl does; `preview` needs no cluster."
)]
pub struct Cli {
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Which cluster and namespace, as kubectl chooses them.
#[derive(Args, Debug, Clone, Default, PartialEq)]
pub struct KubeArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster)
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: the current context)
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// Namespace of the Segment (default: the context's namespace)
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
}

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum Command {
    /// Run Segment definitions locally against a lake and print members, a sample and the compiled SQL
    Preview(PreviewArgs),
    /// Request a run now (sets the segmentation.dev/run-requested-at annotation)
    Run {
        /// The Segment
        name: String,
    },
    /// Approve a version held by the rollover guard (sets segmentation.dev/approve-version)
    Approve {
        /// The Segment
        name: String,
        /// The held version to roll over to
        #[arg(long, value_name = "N")]
        version: u64,
    },
    /// Serve a retained version (sets spec.pinVersion), or go back to the newest with --clear
    Rollback {
        /// The Segment
        name: String,
        /// The retained version to serve
        #[arg(long, value_name = "N", required_unless_present = "clear", conflicts_with = "clear")]
        to_version: Option<u64>,
        /// Remove spec.pinVersion: serve the newest version again
        #[arg(long)]
        clear: bool,
    },
    /// Show the versions, the run in flight and the conditions of a Segment
    Status {
        /// The Segment
        name: String,
    },
}

#[derive(Args, Debug, Clone, PartialEq)]
pub struct PreviewArgs {
    /// Manifest file with the Segment(s) to preview
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    /// Preview only this Segment of the file (default: every Segment in it)
    pub name: Option<String>,
    /// The lake (or a sample of it): replaces the bucket of s3:// locations and the first
    /// directory of file:// ones in SegmentSources and static lists
    #[arg(long, value_name = "DIR_OR_URI")]
    pub lake: Option<String>,
    /// SegmentSource manifests, and Segments that definitions refer to (default: the directory of FILE)
    #[arg(long, value_name = "FILE_OR_DIR")]
    pub sources: Option<PathBuf>,
    /// Member ids to print
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub limit: usize,
    /// Evaluate `now()` and `within` windows at this time (RFC 3339; default: now)
    #[arg(long, value_name = "TIME")]
    pub snapshot_time: Option<DateTime<Utc>>,
}
