//! How our processes dial a gRPC server: tonic's `Endpoint`, with the HTTP/2 settings a
//! long-lived connection carrying thousands of short calls a second needs, all through the
//! client's documented options (docs/decisions/directory-client.md). Billing's client of the
//! directory and the load generator both use it.
//!
//! The receive windows are hyper's client defaults (5 MiB for the connection, 2 MiB per
//! stream), far above HTTP/2's 64 KiB: a page of a thousand users (about 200 KB) or a burst
//! of hundreds of answers arriving before their callers read them never waits for a window
//! update, and h2's budget for small DATA frames (half the connection window) is never spent
//! by answers in flight (`tests/tests/directory_client.rs`).

use std::time::Duration;

use anyhow::Context as _;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use tonic::transport::{Channel, Endpoint};

use crate::tls::ClientTls;

/// A ping every 20 s, also while idle; a connection whose ping is not answered within 5 s is
/// dropped, and the channel connects again on the next call.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Streams this client reset (its caller gave up: a deadline, a cancelled call) that h2
/// remembers, and for how long. A late answer on a remembered stream is dropped quietly; on a
/// forgotten one h2 resets the stream again and counts that against its limit of 1,024 such
/// resets per connection (the guard stays on), after which it ends the connection. h2's
/// default (50 for 1 s) is spent in a moment when a slow directory makes hundreds of callers
/// give up at once.
pub const REMEMBERED_RESETS: usize = 10_000;
pub const REMEMBER_RESETS_FOR: Duration = Duration::from_secs(10);

/// An endpoint for `url` (`http://host:port`, or `https://host:port` with `tls`), connecting
/// within `connect_timeout`.
pub fn endpoint(
    url: &str,
    connect_timeout: Duration,
    tls: Option<&ClientTls>,
) -> anyhow::Result<Endpoint> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("invalid URL {url:?}"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => anyhow::bail!("URL {url:?} must start with http:// or https://"),
    };
    let host = uri
        .host()
        .filter(|host| !host.is_empty())
        .with_context(|| format!("URL {url:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let endpoint = Endpoint::from(uri)
        .connect_timeout(connect_timeout)
        // Small frames (a call, a ping) must not wait for the peer's delayed ACK.
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .http2_max_concurrent_reset_streams(REMEMBERED_RESETS)
        .http2_reset_stream_duration(REMEMBER_RESETS_FOR);
    match (https, tls) {
        (false, _) => Ok(endpoint),
        (true, None) => {
            anyhow::bail!("URL {url:?} is https:// but no TLS settings were given (--directory-ca)")
        }
        (true, Some(tls)) => {
            let ca = tls.ca_pem.as_deref().with_context(|| {
                format!("TLS towards {url:?} needs a CA to trust (--directory-ca)")
            })?;
            // tonic reads the PEM only when it connects, and skips what it cannot read.
            let certificates = CertificateDer::pem_slice_iter(ca)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    anyhow::anyhow!("the CA for {url:?} is not PEM (--directory-ca): {e}")
                })?;
            anyhow::ensure!(
                !certificates.is_empty(),
                "the CA for {url:?} holds no certificate (--directory-ca)"
            );
            endpoint
                .tls_config(tls.config().domain_name(host))
                .with_context(|| format!("the TLS settings for {url:?} (--directory-ca)"))
        }
    }
}

/// A channel to `endpoint` over one HTTP/2 connection, opened on its first call and again
/// after it ends, so a process starts while the server is down. The connect timeout covers
/// the TCP connection and the TLS handshake both: tonic applies it to a connector it is given
/// as a whole (`connect_lazy` gives it to the TCP connection only, and a server that accepts
/// TCP but never finishes the handshake would hold the channel for good).
pub fn lazy_channel(endpoint: &Endpoint) -> Channel {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    endpoint.connect_with_connector_lazy(tcp)
}

/// `connections` such channels, each its own HTTP/2 connection.
pub fn lazy_channels(endpoint: &Endpoint, connections: usize) -> Vec<Channel> {
    (0..connections.max(1))
        .map(|_| lazy_channel(endpoint))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(url: &str, tls: Option<&ClientTls>) -> String {
        endpoint(url, Duration::from_secs(1), tls)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn endpoints_come_from_urls() {
        for url in [
            "http://127.0.0.1:50051",
            "http://directory",
            "http://[::1]:7000",
        ] {
            let endpoint = endpoint(url, Duration::from_secs(1), None).expect(url);
            assert_eq!(endpoint.uri().to_string().trim_end_matches('/'), url);
        }
        assert!(refused("ftp://host:1", None).contains("http://"));
        assert!(refused("127.0.0.1:50051", None).contains("http://"));
        assert!(refused("https://localhost:1", None).contains("--directory-ca"));
        let no_ca = ClientTls {
            ca_pem: None,
            identity: None,
        };
        assert!(refused("https://localhost:1", Some(&no_ca)).contains("--directory-ca"));
        let garbage = ClientTls {
            ca_pem: Some(b"not a certificate".to_vec()),
            identity: None,
        };
        assert!(refused("https://localhost:1", Some(&garbage)).contains("--directory-ca"));
    }
}
