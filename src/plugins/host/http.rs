//! `http.fetch`: requests to the hosts a plugin declares (and the operator allows), to public
//! addresses only. A declared name that resolves to loopback, link-local, private, carrier-grade
//! NAT, multicast or unspecified addresses is refused unless the operator lists the network in
//! `PLUGIN_ALLOWED_NETWORKS`; the check is made on the address each connection actually uses
//! (the client resolves through [`NetworkPolicy`]), so DNS cannot send it elsewhere after the
//! check. A call waits no longer than its deadline (or until its job is terminated), follows no
//! redirect, and reads the response body as it streams, stopping at `PLUGIN_FETCH_MAX_BYTES`.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ipnet::IpNet;

use super::super::runtime::bindings::appliance::plugin::http;
use super::HostState;

const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a fetch looks whether its job was terminated.
const STOP_POLL: Duration = Duration::from_millis(20);

/// Which addresses plugins may reach, and the client that connects only to those.
pub struct NetworkPolicy {
    allowed: Vec<IpNet>,
    client: Result<reqwest::Client, String>,
}

/// True for addresses that are not on the public internet.
fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                // Carrier-grade NAT, 100.64.0.0/10.
                || (a == 100 && (64..128).contains(&b))
                // Benchmarking, 198.18.0.0/15; reserved, 240.0.0.0/4.
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // Unique local fc00::/7, link-local fe80::/10.
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

impl NetworkPolicy {
    /// A policy that lets plugins reach public addresses and the `allowed` networks.
    pub fn new(allowed: Vec<IpNet>) -> Arc<NetworkPolicy> {
        Arc::new_cyclic(|me: &std::sync::Weak<NetworkPolicy>| {
            let resolver = Arc::new(Resolver { policy: me.clone() });
            let client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .dns_resolver(resolver)
                .build()
                .map_err(|e| format!("cannot build the HTTP client: {e}"));
            NetworkPolicy { allowed, client }
        })
    }

    /// True if plugins may connect to `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        !is_internal(ip) || self.allowed.iter().any(|net| net.contains(&ip))
    }
}

/// Resolves names for plugin requests, keeping only the addresses the policy permits.
struct Resolver {
    policy: std::sync::Weak<NetworkPolicy>,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let policy = policy.upgrade().ok_or("the network policy is gone")?;
            let permitted: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| policy.permits(a.ip()))
                .collect();
            if permitted.is_empty() {
                let addresses: Vec<String> = found.iter().map(|a| a.ip().to_string()).collect();
                return Err(format!(
                    "{host} resolves to {} only, which plugins may not reach (loopback, link-local and private networks need PLUGIN_ALLOWED_NETWORKS)",
                    addresses.join(", ")
                )
                .into());
            }
            Ok(Box::new(permitted.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The runtime plugin requests run on, off the pipeline's and the workers' threads.
fn io_runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("plugin-http")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the plugins' HTTP runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// An error with the chain of its causes (a TLS failure is several levels down).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl HostState {
    fn refuse(&mut self, why: String) -> Result<http::Response, String> {
        self.log("warn", format!("http.fetch refused: {why}"));
        Err(why)
    }
}

impl http::Host for HostState {
    fn fetch(&mut self, request: http::Request) -> Result<http::Response, String> {
        let url = reqwest::Url::parse(&request.url)
            .map_err(|e| format!("invalid URL {:?}: {e}", request.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return self.refuse(format!("{:?} is not an http(s) URL", request.url));
        }
        let host = url.host_str().unwrap_or_default().to_owned();
        let declared = self
            .scope
            .allowed_hosts
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(&host));
        if !declared {
            return self.refuse(format!(
                "host {host:?} is not among the hosts this plugin may call"
            ));
        }
        let literal = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        };
        if let Some(ip) = literal.filter(|ip| !self.scope.network.permits(*ip)) {
            return self.refuse(format!(
                "{ip} is an address plugins may not reach (loopback, link-local and private networks need PLUGIN_ALLOWED_NETWORKS)"
            ));
        }
        let asked = request
            .timeout_ms
            .map(|ms| Duration::from_millis(ms.into()))
            .unwrap_or(DEFAULT_FETCH_TIMEOUT)
            .min(MAX_FETCH_TIMEOUT);
        let wait = asked.min(self.remaining());
        if wait.is_zero() {
            return Err("the call has no time left for a request".into());
        }
        let method =
            reqwest::Method::from_bytes(request.method.as_bytes()).map_err(|e| e.to_string())?;
        let client = self.scope.network.client.clone()?;
        let mut builder = client.request(method, url);
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        if let Some(body) = request.body {
            builder = builder.body(body);
        }
        let max_bytes = self.scope.quotas.fetch_max_bytes;
        let stop = self.job.as_ref().map(|j| j.stop.clone());
        let exchange = async move {
            let mut response = builder.send().await.map_err(|e| with_causes(&e))?;
            let status = response.status().as_u16();
            let headers = response
                .headers()
                .iter()
                .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.to_string(), v.to_owned())))
                .collect();
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| with_causes(&e))? {
                if body.len() + chunk.len() > max_bytes {
                    return Err(format!(
                        "the response body is larger than PLUGIN_FETCH_MAX_BYTES ({max_bytes} bytes)"
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(http::Response {
                status,
                headers,
                body,
            })
        };
        let terminated = async move {
            loop {
                tokio::time::sleep(STOP_POLL).await;
                if stop.as_ref().is_some_and(|s| s.terminated()) {
                    return;
                }
            }
        };
        let result = io_runtime()?.block_on(async move {
            tokio::select! {
                result = exchange => result,
                _ = tokio::time::sleep(wait) => Err(format!("no answer within {} ms (the call's deadline or the request's timeout)", wait.as_millis())),
                _ = terminated => Err("the job was terminated".into()),
            }
        });
        if let Err(e) = &result {
            self.log("warn", format!("http.fetch to {host} failed: {e}"));
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused_unless_their_network_is_allowed() {
        let closed = NetworkPolicy::new(Vec::new());
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            let ip: IpAddr = internal.parse().unwrap();
            assert!(!closed.permits(ip), "{internal}");
        }
        for public in ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"] {
            assert!(closed.permits(public.parse().unwrap()), "{public}");
        }
        let open = NetworkPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(open.permits("127.0.0.1".parse().unwrap()));
        assert!(!open.permits("10.0.0.1".parse().unwrap()));
    }
}
