//! Prometheus metrics, served on a listener of their own (`--metrics-listen`).
//!
//! Names: `grpc_server_handled_total{method,code}`, `grpc_server_handling_seconds{method}`
//! (histogram), `grpc_server_in_flight`, `db_pool_connections{state}`, and billing's
//! `directory_client_requests_total{code}` and `directory_client_request_seconds`, and
//! `log_lines_dropped_total` (see [`crate::logs::LogGuard::report_drops`]).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use prost::Message as _;
use tonic::Code;

/// Latency buckets, in seconds: 250 µs to 10 s.
const BUCKETS: [f64; 14] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Installs the process-wide recorder and serves `/metrics` on `addr`. Call once, inside the
/// tokio runtime.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &BUCKETS)?
        .install()
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    tracing::info!(%addr, "serving metrics at /metrics");
    Ok(())
}

/// The `method` label for a request path: the path itself when it names a method these
/// servers know (so a caller cannot grow the label set), else `unknown`.
pub fn method_label(path: &str) -> &'static str {
    static KNOWN: OnceLock<HashSet<&'static str>> = OnceLock::new();
    let known = KNOWN.get_or_init(|| {
        let mut paths = HashSet::new();
        // Ours, then the health and reflection services every server also serves.
        let others: Vec<prost_types::FileDescriptorSet> = [
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ]
        .into_iter()
        .filter_map(|set| prost_types::FileDescriptorSet::decode(set).ok())
        .collect();
        for decoded in std::iter::once(contract::descriptors()).chain(&others) {
            for file in &decoded.file {
                for service in &file.service {
                    for method in &service.method {
                        let path =
                            format!("/{}.{}/{}", file.package(), service.name(), method.name());
                        paths.insert(&*Box::leak(path.into_boxed_str()));
                    }
                }
            }
        }
        paths
    });
    known.get(path).copied().unwrap_or("unknown")
}

/// The canonical name of a status code, as gRPC writes it (`OK`, `INVALID_ARGUMENT`, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Records one finished RPC.
pub fn record_rpc(method: &'static str, code: Code, elapsed: Duration) {
    metrics::counter!("grpc_server_handled_total", "method" => method, "code" => code_name(code))
        .increment(1);
    metrics::histogram!("grpc_server_handling_seconds", "method" => method)
        .record(elapsed.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_methods_become_labels() {
        assert_eq!(
            method_label("/directory.v1.DirectoryService/Authorize"),
            "/directory.v1.DirectoryService/Authorize"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        assert_eq!(
            method_label("/directory.v1.DirectoryService/Nope123"),
            "unknown"
        );
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
    }
}
