//! The cluster and namespace, chosen as kubectl chooses them: `--kubeconfig`
//! or `$KUBECONFIG` or `~/.kube/config` (in-cluster credentials when there is
//! none), `--context` or the current context, `-n` or the context's
//! namespace.

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::cli::KubeArgs;
use crate::PluginError;

/// The client configuration and the namespace to act in.
pub async fn config(args: &KubeArgs) -> Result<(Config, String), PluginError> {
    let failed = |e: &dyn std::fmt::Display| PluginError::Config(e.to_string());
    let mut config = if args.kubeconfig.is_none() && args.context.is_none() {
        Config::infer().await.map_err(|e| failed(&e))?
    } else {
        let options = KubeConfigOptions { context: args.context.clone(), ..Default::default() };
        let kubeconfig = match &args.kubeconfig {
            Some(path) => Kubeconfig::read_from(path).map_err(|e| failed(&e))?,
            None => Kubeconfig::read().map_err(|e| failed(&e))?,
        };
        Config::from_custom_kubeconfig(kubeconfig, &options).await.map_err(|e| failed(&e))?
    };
    config.apply_debug_overrides();
    let namespace = args.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    Ok((config, namespace))
}

/// A client for the chosen cluster and the namespace to act in.
pub async fn client(args: &KubeArgs) -> Result<(Client, String), PluginError> {
    let (config, namespace) = config(args).await?;
    let client = Client::try_from(config).map_err(|e| PluginError::Config(e.to_string()))?;
    Ok((client, namespace))
}
