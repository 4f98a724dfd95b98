//! The cluster and namespace, chosen as kubectl chooses them: `--kubeconfig`
//! or `$KUBECONFIG` or `~/.kube/config` (in-cluster credentials when there is
//! none), `--context` or the current context, `-n` or the context's
//! namespace. Like kubectl, it goes through the proxy that `HTTPS_PROXY`
//! (`HTTP_PROXY` for an `http://` server) names, unless the kubeconfig sets
//! `proxy-url` or `NO_PROXY` covers the server.

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
    // kube fills proxy_url from the kubeconfig's proxy-url or else from
    // HTTPS_PROXY, but checks NO_PROXY against the proxy's address instead
    // of the server's, and ignores loopback and HTTP_PROXY: decide anew
    // unless the kubeconfig named the proxy.
    let env = |name: &str| std::env::var(name).ok();
    let env_proxy = ["HTTPS_PROXY", "https_proxy"].iter().find_map(|n| env(n).filter(|v| !v.is_empty()));
    let from_kubeconfig =
        config.proxy_url.as_ref().is_some_and(|p| env_proxy.as_deref().and_then(|e| e.parse().ok()).as_ref() != Some(p));
    if !from_kubeconfig {
        config.proxy_url = proxy_from_env(&config.cluster_url, env)?;
    }
    let namespace = args.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    Ok((config, namespace))
}

/// A client for the chosen cluster and the namespace to act in.
pub async fn client(args: &KubeArgs) -> Result<(Client, String), PluginError> {
    let (config, namespace) = config(args).await?;
    let client = Client::try_from(config).map_err(|e| PluginError::Config(e.to_string()))?;
    Ok((client, namespace))
}

/// The proxy for `server` from the environment, with the rules kubectl
/// (Go's `httpproxy.FromEnvironment`) applies: `HTTPS_PROXY` for https and
/// `HTTP_PROXY` for http servers, upper or lower case; none for a host
/// that `NO_PROXY` lists (`*`, a host or domain suffix, an IP or CIDR) or
/// for localhost and loopback addresses.
pub fn proxy_from_env(server: &http::Uri, var: impl Fn(&str) -> Option<String>) -> Result<Option<http::Uri>, PluginError> {
    let read = |name: &str| var(name).or_else(|| var(&name.to_lowercase())).filter(|v| !v.is_empty());
    let proxy = match server.scheme_str() {
        Some("https") => read("HTTPS_PROXY"),
        _ => read("HTTP_PROXY"),
    };
    let Some(proxy) = proxy else { return Ok(None) };
    let host = server.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let ip = host.parse::<std::net::IpAddr>().ok();
    if host == "localhost" || ip.is_some_and(|ip| ip.is_loopback()) {
        return Ok(None);
    }
    let no_proxy = read("NO_PROXY").unwrap_or_default();
    let bypassed = no_proxy.split(',').map(|e| e.trim().to_ascii_lowercase()).filter(|e| !e.is_empty()).any(|entry| {
        if entry == "*" {
            return true;
        }
        // A port in the entry must match the server's.
        let (entry_host, entry_port) = match entry.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') && p.parse::<u16>().is_ok() => (h.to_string(), p.parse::<u16>().ok()),
            _ => (entry.clone(), None),
        };
        if entry_port.is_some_and(|p| Some(p) != server.port_u16()) {
            return false;
        }
        if let (Some(ip), Ok(network)) = (ip, entry_host.parse::<ipnet::IpNet>()) {
            return network.contains(&ip);
        }
        if let (Some(ip), Ok(entry_ip)) = (ip, entry_host.parse::<std::net::IpAddr>()) {
            return ip == entry_ip;
        }
        let domain = entry_host.trim_start_matches("*.").trim_start_matches('.');
        host == domain || host.ends_with(&format!(".{domain}"))
    });
    if bypassed {
        return Ok(None);
    }
    // `host:port` without a scheme means an http proxy, as in Go.
    let proxy = if proxy.contains("://") { proxy } else { format!("http://{proxy}") };
    proxy.parse().map(Some).map_err(|e| PluginError::Config(format!("HTTPS_PROXY/HTTP_PROXY {proxy:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::proxy_from_env;

    fn proxy(server: &str, env: &[(&str, &str)]) -> Option<String> {
        let server: http::Uri = server.parse().unwrap();
        let lookup = |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
        proxy_from_env(&server, lookup).unwrap().map(|u| u.to_string())
    }

    #[test]
    fn https_servers_use_https_proxy_and_no_proxy_bypasses_it() {
        let env = [("HTTPS_PROXY", "http://proxy:3128"), ("NO_PROXY", "internal.example, .corp,10.0.0.0/8,api.x:6443")];
        assert_eq!(proxy("https://api.example.com:6443", &env).as_deref(), Some("http://proxy:3128/"));
        assert_eq!(proxy("https://internal.example:6443", &env), None);
        assert_eq!(proxy("https://k8s.internal.example", &env), None);
        assert_eq!(proxy("https://api.corp:443", &env), None);
        assert_eq!(proxy("https://10.1.2.3:6443", &env), None);
        assert_eq!(proxy("https://api.x:6443", &env), None);
        assert_eq!(proxy("https://api.x:443", &env).as_deref(), Some("http://proxy:3128/"));
        // kubectl never proxies loopback.
        assert_eq!(proxy("https://127.0.0.1:6443", &env), None);
        assert_eq!(proxy("https://localhost:6443", &env), None);
    }

    #[test]
    fn lower_case_names_a_bare_host_port_and_plain_http() {
        assert_eq!(proxy("https://api:6443", &[("https_proxy", "proxy:3128")]).as_deref(), Some("http://proxy:3128/"));
        assert_eq!(proxy("http://api:8080", &[("HTTPS_PROXY", "http://p:1")]), None);
        assert_eq!(proxy("http://api:8080", &[("HTTP_PROXY", "http://p:1")]).as_deref(), Some("http://p:1/"));
        assert_eq!(proxy("https://api:6443", &[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", "*")]), None);
    }
}
