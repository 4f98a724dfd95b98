//! The one naming rule of the binaries' settings: every setting is a flag
//! (shown by `--help`), and its environment fallback is the flag's name in
//! upper snake case (`--cache-ttl-ms` and `CACHE_TTL_MS`). Names the
//! Kubernetes ecosystem fixes are the only exceptions, listed in
//! [`CONVENTIONAL_ENV`]. Each binary's tests run
//! [`env_name_violations`] over its command line.

/// Flags whose environment name is a Kubernetes convention instead:
/// the downward-API values and the watched namespace.
pub const CONVENTIONAL_ENV: [(&str, &str); 3] =
    [("namespace", "WATCH_NAMESPACE"), ("lease-namespace", "POD_NAMESPACE"), ("identity", "POD_NAME")];

/// The environment name the rule gives a flag.
pub fn env_name(flag: &str) -> String {
    match CONVENTIONAL_ENV.iter().find(|(f, _)| *f == flag) {
        Some((_, env)) => env.to_string(),
        None => flag.replace('-', "_").to_ascii_uppercase(),
    }
}

/// Every breach of the rule in `command` and its subcommands: a setting
/// without a long flag, a flag without an environment fallback, or one
/// whose environment name is not the rule's. Positional arguments and
/// clap's own `--help`/`--version` are exempt, and so are the flags of the
/// `one_shot` subcommands (tools run by hand, such as `generate-lake`),
/// which need no fallback but must still name it right when they have one.
pub fn env_name_violations(command: &clap::Command, one_shot: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    collect(command, command.get_name(), false, one_shot, &mut found);
    found
}

/// Fails, listing every breach, unless `command` follows the rule: the
/// one assertion each binary's `every_setting_follows_the_naming_rule`
/// test makes.
pub fn assert_follows_naming_rule(command: &clap::Command, one_shot: &[&str]) {
    let violations = env_name_violations(command, one_shot);
    assert!(violations.is_empty(), "settings that break the naming rule: {violations:#?}");
}

fn collect(command: &clap::Command, path: &str, one_shot: bool, one_shots: &[&str], found: &mut Vec<String>) {
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if arg.is_positional() || id == "help" || id == "version" {
            continue;
        }
        match (arg.get_long(), arg.get_env()) {
            (Some(flag), Some(env)) if env.to_str() == Some(env_name(flag).as_str()) => {}
            (Some(flag), Some(env)) => {
                found.push(format!("{path} --{flag}: env {} should be {}", env.to_string_lossy(), env_name(flag)))
            }
            (Some(_), None) if one_shot => {}
            (Some(flag), None) => found.push(format!("{path} --{flag}: no environment fallback ({})", env_name(flag))),
            (None, _) => found.push(format!("{path} {id}: a setting without a long flag")),
        }
    }
    for sub in command.get_subcommands() {
        let is_one_shot = one_shot || one_shots.contains(&sub.get_name());
        collect(sub, &format!("{path} {}", sub.get_name()), is_one_shot, one_shots, found);
    }
}

#[cfg(test)]
mod tests {
    use clap::{Arg, Command};

    use super::*;

    #[test]
    fn the_rule_finds_every_kind_of_breach() {
        let command = Command::new("bin")
            .arg(Arg::new("dir"))
            .arg(Arg::new("cache-ttl-ms").long("cache-ttl-ms").env("CACHE_TTL_MS"))
            .arg(Arg::new("namespace").long("namespace").env("WATCH_NAMESPACE"))
            .subcommand(
                Command::new("run")
                    .arg(Arg::new("listen").long("listen").env("SERVING_LISTEN"))
                    .arg(Arg::new("threads").long("threads"))
                    .arg(Arg::new("hidden").short('x').env("X")),
            )
            .subcommand(
                Command::new("generate").arg(Arg::new("out").long("out")).arg(Arg::new("seed").long("seed").env("GENERATE_SEED")),
            );
        assert_eq!(
            env_name_violations(&command, &["generate"]),
            [
                "bin run --listen: env SERVING_LISTEN should be LISTEN",
                "bin run --threads: no environment fallback (THREADS)",
                "bin run hidden: a setting without a long flag",
                "bin generate --seed: env GENERATE_SEED should be SEED",
            ]
        );
    }
}
