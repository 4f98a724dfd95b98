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
        Command::Standalone(args) => {
            if let Err(error) = segment_operator::standalone::run(args).await {
                eprintln!("segment-operator: {error}");
                std::process::exit(1);
            }
        }
        Command::Run(args) => {
            init_logging(args.log_json);
            if let Err(error) = segment_operator::controller::run(*args).await {
                eprintln!("segment-operator: {error}");
                std::process::exit(1);
            }
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
