//! `kubectl-segment`: on PATH, kubectl runs it as `kubectl segment`.

use clap::Parser;
use kubectl_segment::cli::Cli;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match kubectl_segment::execute(cli, chrono::Utc::now()).await {
        Ok(output) => {
            print!("{}", output.stdout);
            eprint!("{}", output.stderr);
            if !output.success {
                std::process::exit(1);
            }
        }
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(1);
        }
    }
}
