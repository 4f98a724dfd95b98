//! `segment-operator`: a thin shell over the library; each subcommand is
//! one call.

use clap::Parser;
use segment_operator::config::{Cli, Command};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => print!("{}", segment_core::api::crds_yaml()),
        Command::Check { paths } => {
            let manifests = segment_operator::manifests::load(&paths).unwrap_or_else(|e| {
                eprintln!("segment-operator: {e}");
                std::process::exit(2);
            });
            let (report, all_ok) = segment_operator::check::report(&manifests, chrono::Utc::now());
            print!("{report}");
            std::process::exit(if all_ok { 0 } else { 1 });
        }
        #[cfg(feature = "standalone")]
        Command::Standalone(args) => {
            // Standalone prints its own story to stdout; the libraries'
            // warnings (a part that failed, a store that did not answer)
            // go to stderr through the log.
            segment_runtime::init_tracing(false, "warn,segment=info");
            if let Err(error) = segment_operator::standalone::run(args).await {
                eprintln!("segment-operator: {error}");
                std::process::exit(1);
            }
        }
        Command::Run(args) => {
            segment_runtime::init_tracing(args.log.log_json, "info,kube=warn");
            if let Err(error) = segment_operator::controller::run(*args).await {
                eprintln!("segment-operator: {error}");
                std::process::exit(1);
            }
        }
    }
}
