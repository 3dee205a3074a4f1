//! What both servers do the same way at the gRPC edge: error statuses with rich details,
//! health and reflection, a span per RPC carrying a request id, and shutdown signals.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codec::CompressionEncoding;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt as _};

use tracing::Instrument as _;

use contract::fields::Violation;
use contract::refusal::Refusal;

/// A `Status` carrying `google.rpc.ErrorInfo` (`reason`, `domain`) and, when `violations` is
/// not empty, `google.rpc.BadRequest` with one field violation each.
pub fn status(
    domain: &str,
    code: Code,
    reason: &str,
    message: impl Into<String>,
    violations: &[Violation],
) -> Status {
    let mut details = ErrorDetails::with_error_info(
        reason,
        domain,
        std::collections::HashMap::<String, String>::new(),
    );
    if !violations.is_empty() {
        details.set_bad_request(
            violations
                .iter()
                .map(|v| FieldViolation::new(v.field.clone(), v.description.clone()))
                .collect::<Vec<_>>(),
        );
    }
    Status::with_error_details(code, message, details)
}

/// The code, `ErrorInfo` reason and field violations of a refusal both services share.
pub fn refusal(refusal: &Refusal) -> (Code, &'static str, Vec<Violation>) {
    match refusal {
        Refusal::InvalidArgument(violations) => (
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            violations.clone(),
        ),
        Refusal::InvalidPageToken(why) => (
            Code::InvalidArgument,
            "INVALID_PAGE_TOKEN",
            vec![Violation::new("page_token", why.to_string())],
        ),
        Refusal::MissingToken => (Code::Unauthenticated, "MISSING_TOKEN", vec![]),
        Refusal::InvalidToken => (Code::Unauthenticated, "INVALID_TOKEN", vec![]),
        Refusal::InvalidCursor(why) => (
            Code::InvalidArgument,
            "INVALID_CURSOR",
            vec![Violation::new("start_after", *why)],
        ),
        Refusal::CursorExpired => (Code::OutOfRange, "CURSOR_EXPIRED", vec![]),
        Refusal::ConsumerTooSlow => (Code::Aborted, "CONSUMER_TOO_SLOW", vec![]),
        Refusal::TooManyStreams => (Code::ResourceExhausted, "TOO_MANY_STREAMS", vec![]),
        Refusal::ShuttingDown => (Code::Unavailable, "SHUTTING_DOWN", vec![]),
    }
}

/// The code and reason of a database that cannot be reached now (the caller may retry);
/// the cause is logged, never sent.
pub fn database_unavailable(source: &anyhow::Error) -> (Code, &'static str, Vec<Violation>) {
    tracing::warn!(error = format!("{source:#}"), "database unavailable");
    (Code::Unavailable, "DATABASE_UNAVAILABLE", vec![])
}

/// The code and reason of an internal error; the cause is logged, never sent.
pub fn internal(source: &anyhow::Error) -> (Code, &'static str, Vec<Violation>) {
    tracing::error!(error = format!("{source:#}"), "internal error");
    (Code::Internal, "INTERNAL", vec![])
}

/// RESOURCE_EXHAUSTED with `ErrorInfo` and `RetryInfo` (when to try again).
pub fn throttled(
    domain: &str,
    reason: &str,
    message: impl Into<String>,
    retry: std::time::Duration,
) -> Status {
    let mut details = ErrorDetails::with_error_info(
        reason,
        domain,
        std::collections::HashMap::<String, String>::new(),
    );
    details.set_retry_info(Some(retry));
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// Largest request a server decodes (both services: 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// The encodings both servers accept compressed requests in and compress answers with (when
/// the caller lists one in `grpc-accept-encoding`): all that tonic implements.
pub const ENCODINGS: [CompressionEncoding; 3] = [
    CompressionEncoding::Gzip,
    CompressionEncoding::Deflate,
    CompressionEncoding::Zstd,
];

/// Answers smaller than this go out uncompressed even to a caller that accepts compression:
/// below it compression saves a few dozen bytes at most and costs a compressor per call.
/// See `docs/decisions/response-compression.md`.
pub const COMPRESS_FROM_BYTES: usize = 1024;

/// A handler's answer: compressed (if the caller accepts it) only when it is at least
/// [`COMPRESS_FROM_BYTES`] long.
pub fn reply<T: prost::Message>(message: T) -> tonic::Response<T> {
    let small = message.encoded_len() < COMPRESS_FROM_BYTES;
    let mut response = tonic::Response::new(message);
    if small {
        response.disable_compression();
    }
    response
}

/// When the caller's deadline (its `grpc-timeout`) runs out, counted from the moment the call
/// reached the server, less a millisecond (tokio's timer tick, so that it fires before tonic's).
/// The layer puts it in the request's extensions when the caller sent one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

/// How much earlier than tonic's timer ours fires (tokio's timer resolution).
const TIMER_TICK: std::time::Duration = std::time::Duration::from_millis(1);

/// The message of the DEADLINE_EXCEEDED a call gets when its deadline passes on the server.
const DEADLINE_PASSED: &str = "the caller's deadline passed before the call completed";

/// The bearer token of a request's `authorization` metadata, if it has one of the form
/// `Bearer <token>` (scheme case-insensitive).
pub fn bearer_token<T>(request: &tonic::Request<T>) -> Option<&str> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Server reflection v1 over our descriptor sets plus health's and `google.rpc`'s, so grpcurl
/// can list services and decode error details with no proto files. Lists only `service`,
/// health and reflection: the services this server really serves.
pub fn reflection_v1(
    service: &str,
) -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    reflection_builder(service).build_v1()
}

/// Server reflection v1alpha (what grpcurl 1.8 speaks), from the same descriptor sets.
pub fn reflection_v1alpha(
    service: &str,
) -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    reflection_builder(service).build_v1alpha()
}

fn reflection_builder(service: &str) -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .with_service_name(service)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        .register_encoded_file_descriptor_set(contract::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
}

/// Health for `""` and `service`, both SERVING.
pub async fn health(
    service: &str,
) -> (
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, server) = tonic_health::server::health_reporter();
    for name in ["", service] {
        reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    (reporter, server)
}

/// Marks `""` and `service` NOT_SERVING, so balancers stop sending before the drain.
pub async fn set_not_serving(reporter: &tonic_health::server::HealthReporter, service: &str) {
    for name in ["", service] {
        reporter
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(term) => term,
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

// Header names parsed once: a `&str` name is parsed and validated on every lookup.
/// The metadata key of the request id: the caller's when it is sane (1 to 128 visible ASCII
/// characters), else a UUID the RPC layer put there; echoed in the response metadata.
pub const REQUEST_ID_KEY: &str = "x-request-id";
/// The metadata key of the W3C trace context; the RPC layer replaces the caller's with this
/// hop's.
pub const TRACEPARENT_KEY: &str = "traceparent";
const REQUEST_ID: http::HeaderName = http::HeaderName::from_static(REQUEST_ID_KEY);
const TRACEPARENT: http::HeaderName = http::HeaderName::from_static(TRACEPARENT_KEY);
const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");
const GRPC_ENCODING: http::HeaderName = http::HeaderName::from_static("grpc-encoding");
const GRPC_ACCEPT_ENCODING: http::HeaderName =
    http::HeaderName::from_static("grpc-accept-encoding");
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_STATUS_DETAILS: http::HeaderName =
    http::HeaderName::from_static("grpc-status-details-bin");

/// The W3C trace context of a call: the caller's trace id (or a new one) and this hop's span
/// id. The layer puts this hop's in the request's `traceparent` metadata, where billing takes it
/// to send on to the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// 32 lower-case hex digits.
    pub trace_id: String,
    /// 16 lower-case hex digits: this server's hop.
    pub span_id: String,
    /// Two hex digits (`01`: sampled).
    pub flags: String,
}

impl TraceParent {
    /// Continues the caller's `traceparent` (version 00) with a new span id, or starts a trace.
    pub fn continue_from(header: Option<&http::HeaderValue>) -> Self {
        let parsed = header.and_then(|v| v.to_str().ok()).and_then(|v| {
            let mut parts = v.trim().split('-');
            let (version, trace, parent, flags) =
                (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
            let hex = |s: &str, n: usize| {
                s.len() == n
                    && s.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            };
            let valid = version == "00"
                && parts.next().is_none()
                && hex(trace, 32)
                && hex(parent, 16)
                && hex(flags, 2)
                && trace.bytes().any(|b| b != b'0')
                && parent.bytes().any(|b| b != b'0');
            valid.then(|| (trace.to_owned(), flags.to_owned()))
        });
        let (trace_id, flags) = parsed.unwrap_or_else(|| (random_hex(32), "01".to_owned()));
        Self {
            trace_id,
            span_id: random_hex(16),
            flags,
        }
    }

    /// The `traceparent` header value naming this hop as the parent.
    pub fn header(&self) -> String {
        let mut header = String::with_capacity(55);
        for part in ["00", &self.trace_id, &self.span_id, &self.flags] {
            if !header.is_empty() {
                header.push('-');
            }
            header.push_str(part);
        }
        header
    }
}

/// `len` (at most 32) random lower-case hex digits, written without the formatting machinery.
fn random_hex(len: usize) -> String {
    let mut digits = [0; 32];
    let hex = uuid::Uuid::new_v4().simple().encode_lower(&mut digits);
    hex[..len.min(hex.len())].to_owned()
}

/// Records the caller's directory on the current RPC span, once the call is authenticated.
pub fn record_directory(directory_id: &str) {
    tracing::Span::current().record("directory_id", directory_id);
}

/// A header value that differs on every call (a request id, a `traceparent`, a deadline),
/// marked never-indexed: HPACK then sends it as a literal instead of adding it to the
/// connection's dynamic table, where a new value per call would only evict the entries that
/// do repeat (content type, the authority), and where h2 compares a header with every entry
/// of the same name before it adds one, so a table full of request ids cost billing about 4%
/// of its CPU (docs/decisions/hpack-never-indexed.md).
pub fn per_call_value(value: &str) -> Option<http::HeaderValue> {
    let mut value = http::HeaderValue::from_str(value).ok()?;
    value.set_sensitive(true);
    Some(value)
}

fn sane_request_id(value: &http::HeaderValue) -> Option<&str> {
    let s = value.to_str().ok()?;
    (!s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic())).then_some(s)
}

/// Tower layer giving every RPC a `tracing` span (method, request id, gRPC code, latency),
/// counting the calls in flight (so a shutdown knows when the drain is done, and so calls
/// beyond `max_in_flight` are shed at once with RESOURCE_EXHAUSTED instead of queueing), and
/// giving the errors tonic itself produces (message too large, undecodable message, unknown
/// method) the same `ErrorInfo` every other error carries.
#[derive(Debug, Clone)]
pub struct RpcTraceLayer {
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
    domain: &'static str,
}

impl RpcTraceLayer {
    pub fn new(domain: &'static str, max_in_flight: usize) -> Self {
        Self {
            in_flight: Arc::default(),
            max_in_flight: max_in_flight.max(1),
            domain,
        }
    }

    /// How many calls are being handled now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

impl<S> tower::Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTrace {
            inner,
            in_flight: self.in_flight.clone(),
            max_in_flight: self.max_in_flight,
            domain: self.domain,
        }
    }
}

/// See [`RpcTraceLayer`].
#[derive(Debug, Clone)]
pub struct RpcTrace<S> {
    inner: S,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
    domain: &'static str,
}

/// The status of a trailers-only (error) response: its code and whether it already carries
/// rich details.
fn trailers_only_status<B>(response: &http::Response<B>) -> Option<(Code, bool)> {
    let code = response
        .headers()
        .get(&GRPC_STATUS)?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some((
        Code::from_i32(code),
        response.headers().contains_key(&GRPC_STATUS_DETAILS),
    ))
}

/// What the layer knows of a call when tonic answers it without details.
struct CallFacts<'a> {
    /// The request path (`/package.Service/Method`).
    path: &'a str,
    /// The request's `grpc-encoding`, if it named one.
    encoding: Option<&'a str>,
    /// The encodings tonic's answer lists as accepted (`grpc-accept-encoding`): it lists them
    /// exactly when it refused the request's encoding.
    accepted: Option<&'a str>,
}

/// For an error tonic produced itself (no details): the code, ErrorInfo reason and message to
/// send. The message keeps the real cause: the method, the encoding, the decoder's words.
/// Tonic hands the layer these errors as an HTTP answer carrying only a code and a message,
/// so each is told apart by its code and the facts of the call (which encoding the request
/// named, what tonic lists as accepted), never by the message's words; only the field a
/// decode error names is read from prost's message, which has no other form.
fn framework_error(
    code: Code,
    message: &str,
    call: &CallFacts<'_>,
) -> (Code, &'static str, String) {
    let with_cause = |text: &str| match message.trim() {
        "" => text.to_owned(),
        cause => format!("{text}: {cause}"),
    };
    match code {
        // Too large as sent (OUT_OF_RANGE), or once decompressed (RESOURCE_EXHAUSTED: tonic
        // stops inflating at the limit, so a small compressed bomb costs nothing).
        Code::ResourceExhausted => (
            Code::ResourceExhausted,
            "MESSAGE_TOO_LARGE",
            with_cause("the request message is larger than the server accepts"),
        ),
        // A request over the decoding limit (tonic's only OUT_OF_RANGE for a request).
        Code::OutOfRange => (
            Code::ResourceExhausted,
            "MESSAGE_TOO_LARGE",
            with_cause("the request message is larger than the server accepts"),
        ),
        Code::Internal => (
            Code::InvalidArgument,
            "MALFORMED_MESSAGE",
            with_cause("the request is not a valid message of this method"),
        ),
        Code::Unimplemented if call.accepted.is_some() => (
            Code::Unimplemented,
            "UNSUPPORTED_ENCODING",
            format!(
                "the request is compressed with `{}`, which this server does not accept; \
                 it accepts {}",
                call.encoding.unwrap_or_default(),
                call.accepted.unwrap_or_default(),
            ),
        ),
        Code::Unimplemented => (
            Code::Unimplemented,
            "METHOD_NOT_FOUND",
            format!("unknown method {}", call.path),
        ),
        Code::Cancelled => (
            Code::DeadlineExceeded,
            "DEADLINE_EXCEEDED",
            DEADLINE_PASSED.to_owned(),
        ),
        other => (
            other,
            "TRANSPORT",
            with_cause("the request could not be handled"),
        ),
    }
}

/// The request field a decode error names (prost's "failed to decode Protobuf message:
/// SignInRequest.password: invalid string value: ..."), or "" for the message as a whole:
/// broken framing, a field of a nested message, or a `oneof` (prost names the oneof, not
/// which of its fields was bad).
fn undecodable_field(message: &str) -> &str {
    message
        .split_once("message: ")
        .and_then(|(_, rest)| rest.split_once(": "))
        .filter(|(path, _)| request_fields().contains(*path))
        .and_then(|(path, _)| path.split_once('.'))
        .map_or("", |(_, field)| field)
}

/// `Message.field` for every field of every request message of the API (from the descriptor
/// set served by reflection), read once.
fn request_fields() -> &'static std::collections::HashSet<String> {
    static FIELDS: std::sync::OnceLock<std::collections::HashSet<String>> =
        std::sync::OnceLock::new();
    FIELDS.get_or_init(|| {
        contract::descriptors()
            .file
            .iter()
            .flat_map(|file| &file.message_type)
            .filter(|message| message.name().ends_with("Request"))
            .flat_map(|message| {
                message
                    .field
                    .iter()
                    .map(move |field| format!("{}.{}", message.name(), field.name()))
            })
            .collect()
    })
}

/// Replaces the status headers of `response` with `status` (and its details).
fn set_status<B>(response: &mut http::Response<B>, status: Status) {
    let rendered = status.into_http::<()>();
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        response.headers_mut().remove(name);
        if let Some(value) = rendered.headers().get(name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
}

/// Decrements the in-flight count when a call ends, however it ends.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for RpcTrace<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let id = match request.headers().get(&REQUEST_ID).and_then(sane_request_id) {
            Some(id) => id.to_owned(),
            None => {
                let mut buffer = uuid::Uuid::encode_buffer();
                let id = uuid::Uuid::new_v4()
                    .hyphenated()
                    .encode_lower(&mut buffer)
                    .to_owned();
                if let Ok(value) = http::HeaderValue::from_str(&id) {
                    request.headers_mut().insert(REQUEST_ID, value);
                }
                id
            }
        };
        let method = crate::metrics::method_label(request.uri().path());
        let trace = TraceParent::continue_from(request.headers().get(&TRACEPARENT));
        if let Ok(value) = http::HeaderValue::from_str(&trace.header()) {
            request.headers_mut().insert(TRACEPARENT, value);
        }
        let span = tracing::info_span!(
            "rpc",
            method = %request.uri().path(),
            request_id = %id,
            trace_id = %trace.trace_id,
            directory_id = tracing::field::Empty,
            code = tracing::field::Empty,
            latency_us = tracing::field::Empty,
        );
        // The caller's deadline, counted from now, less a millisecond: tonic's own timer
        // (which wraps this layer and answers CANCELLED without details) starts just after
        // ours, and tokio's timers tick in milliseconds. Were both in the same tick, tonic's
        // could be found elapsed when it is first polled while ours, registered a moment
        // earlier, waits for the timer driver's next turn (seen with 1 ns deadlines on a
        // loaded machine). A tick earlier, tonic's wins only if the thread stalls for more
        // than a tick between polling ours and polling it.
        let deadline = request
            .headers()
            .get(&GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .and_then(|timeout| Instant::now().checked_add(timeout.saturating_sub(TIMER_TICK)));
        if let Some(at) = deadline {
            request.extensions_mut().insert(Deadline(at));
        }
        // For the message of a framework error; cheap clones (shared bytes), no allocation.
        let uri = request.uri().clone();
        let encoding = request.headers().get(&GRPC_ENCODING).cloned();
        let domain = self.domain;
        let in_flight = InFlight::enter(&self.in_flight);
        let is_health = request.uri().path().starts_with("/grpc.health.");
        if !is_health && self.in_flight.load(Ordering::Acquire) > self.max_in_flight {
            // Shed at once: a queue without bound only makes every caller late.
            drop(in_flight);
            let _entered = span.enter();
            let mut details = ErrorDetails::with_error_info(
                "OVERLOADED",
                domain,
                std::collections::HashMap::<String, String>::new(),
            );
            details.set_retry_info(Some(std::time::Duration::from_millis(100)));
            let mut response = Status::with_error_details(
                Code::ResourceExhausted,
                "the server is overloaded; retry later",
                details,
            )
            .into_http::<RB>();
            if let Some(value) = per_call_value(&id) {
                response.headers_mut().insert(REQUEST_ID, value);
            }
            span.record("code", "RESOURCE_EXHAUSTED");
            crate::metrics::record_rpc(method, Code::ResourceExhausted, std::time::Duration::ZERO);
            tracing::warn!("rpc shed: too many in flight");
            return Box::pin(async move { Ok(response) });
        }
        metrics::gauge!("grpc_server_in_flight").increment(1.0);
        let started = Instant::now();
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(
            async move {
                let _in_flight = in_flight;
                let mut result = match deadline {
                    None => future.await,
                    Some(at) => tokio::select! {
                        biased;
                        result = future => result,
                        () = tokio::time::sleep_until(at.into()) => {
                            let status =
                                status(domain, Code::DeadlineExceeded, "DEADLINE_EXCEEDED", DEADLINE_PASSED, &[]);
                            Ok(status.into_http::<RB>())
                        }
                    },
                };
                metrics::gauge!("grpc_server_in_flight").decrement(1.0);
                let elapsed = started.elapsed();
                let span = tracing::Span::current();
                span.record("latency_us", elapsed.as_micros() as u64);
                match &mut result {
                    Ok(response) => {
                        // Errors travel trailers-only, so their status is in the headers; an OK
                        // answer carries its status in the trailers.
                        let mut code = Code::Ok;
                        if let Some((status_code, has_details)) = trailers_only_status(response) {
                            code = status_code;
                            if !has_details {
                                let message = Status::from_header_map(response.headers())
                                    .map(|s| s.message().to_owned())
                                    .unwrap_or_default();
                                let call = CallFacts {
                                    path: uri.path(),
                                    encoding: encoding.as_ref().and_then(|v| v.to_str().ok()),
                                    accepted: response
                                        .headers()
                                        .get(&GRPC_ACCEPT_ENCODING)
                                        .and_then(|v| v.to_str().ok()),
                                };
                                let (mapped, reason, text) =
                                    framework_error(status_code, &message, &call);
                                tracing::debug!(?status_code, message, "framework error");
                                // INVALID_ARGUMENT carries BadRequest (the contract): the field
                                // that would not decode, when the decoder named one.
                                let violations = match mapped {
                                    Code::InvalidArgument => vec![Violation::new(
                                        undecodable_field(&message),
                                        text.clone(),
                                    )],
                                    _ => Vec::new(),
                                };
                                let rich = status(domain, mapped, reason, text, &violations);
                                set_status(response, rich);
                                code = mapped;
                            }
                        }
                        span.record("code", crate::metrics::code_name(code));
                        crate::metrics::record_rpc(method, code, elapsed);
                        if let Some(value) = per_call_value(&id) {
                            response.headers_mut().insert(REQUEST_ID, value);
                        }
                        tracing::info!("rpc finished");
                    }
                    Err(_) => tracing::warn!("rpc failed in transport"),
                }
                result
            }
            .instrument(span),
        )
    }
}

/// When the caller's deadline runs out, if it sent one (see [`Deadline`]).
pub fn caller_deadline<T>(request: &tonic::Request<T>) -> Option<Instant> {
    request.extensions().get::<Deadline>().map(|d| d.0)
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    match unit {
        "H" => Some(Duration::from_secs(amount.checked_mul(3600)?)),
        "M" => Some(Duration::from_secs(amount.checked_mul(60)?)),
        "S" => Some(Duration::from_secs(amount)),
        "m" => Some(Duration::from_millis(amount)),
        "u" => Some(Duration::from_micros(amount)),
        "n" => Some(Duration::from_nanos(amount)),
        _ => None,
    }
}

/// How a server runs: its service's full name (for health), how long a shutdown waits for
/// in-flight calls, TLS, the domain of its own errors, and how many calls may be in flight.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub service_name: &'static str,
    pub drain: std::time::Duration,
    /// TLS (and mutual TLS when it names a client CA); plaintext when `None`.
    pub tls: Option<crate::tls::ServerTls>,
    /// `ErrorInfo.domain` of the errors the server itself produces.
    pub error_domain: &'static str,
    /// Calls in flight beyond this are answered RESOURCE_EXHAUSTED at once (health excepted).
    pub max_in_flight: usize,
}

impl ServeOptions {
    /// The defaults of the flags ([`crate::launch::ServeFlags`]): 20 s of drain, plaintext,
    /// 1,024 calls in flight.
    pub fn new(service_name: &'static str, error_domain: &'static str) -> Self {
        Self {
            service_name,
            drain: std::time::Duration::from_secs(20),
            tls: None,
            error_domain,
            max_in_flight: 1024,
        }
    }
}

/// Serves `routes` (plus health and reflection) on `listener` until `shutdown` completes, then
/// reports NOT_SERVING, stops accepting (GOAWAY on open connections) and drains: it returns
/// once no call has been in flight for a short while, or after `drain` at the latest. Idle
/// client connections (a billing replica keeps one to the directory) do not hold it up.
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: tonic::service::Routes,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let addr = listener.local_addr()?;
    let (health, health_service) = health(options.service_name).await;
    // Health answers are a few bytes: accepted compressed, never sent compressed. Reflection's
    // file descriptors are kilobytes: compressed both ways.
    let health_service = ENCODINGS
        .into_iter()
        .fold(health_service, |server, e| server.accept_compressed(e));
    let reflection = ENCODINGS
        .into_iter()
        .fold(reflection_v1(options.service_name)?, |server, e| {
            server.accept_compressed(e).send_compressed(e)
        });
    let reflection_alpha = ENCODINGS
        .into_iter()
        .fold(reflection_v1alpha(options.service_name)?, |server, e| {
            server.accept_compressed(e).send_compressed(e)
        });
    let routes = routes
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let tracer = RpcTraceLayer::new(options.error_domain, options.max_in_flight);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &options.tls {
        builder = builder
            .tls_config(tls.config())
            .context("invalid TLS configuration")?;
    }
    let server = builder
        .layer(tracer.clone())
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            // Small frames (trailers) must not wait for the peer's delayed ACK: no Nagle.
            tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(std::time::Duration::from_secs(60))),
            async move {
                let _ = stop_rx.await;
            },
        );
    tracing::info!(%addr, service = options.service_name, "serving");
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result.context("server failed"),
        () = shutdown => {}
    }
    tracing::info!("shutting down: draining in-flight calls");
    set_not_serving(&health, options.service_name).await;
    let _ = stop_tx.send(());
    let quiet = async {
        // In flight now or within the last 100 ms: keep draining.
        let mut quiet_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            if tracer.in_flight() > 0 {
                quiet_since = None;
            } else if quiet_since.get_or_insert_with(Instant::now).elapsed()
                >= std::time::Duration::from_millis(100)
            {
                return;
            }
        }
    };
    tokio::select! {
        result = &mut server => result.context("server failed while draining")?,
        () = quiet => tracing::info!("no calls in flight; closing idle connections"),
        () = tokio::time::sleep(options.drain) => {
            tracing::warn!(in_flight = tracer.in_flight(), "drain time exceeded; exiting with calls in flight");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn decode_errors_name_the_request_field() {
        let utf8 = "failed to decode Protobuf message: SignInRequest.password: invalid string \
                    value: data is not UTF-8 encoded";
        assert_eq!(undecodable_field(utf8), "password");
        let nested =
            "failed to decode Protobuf message: Inner.name: Outer.inner: invalid wire type";
        assert_eq!(undecodable_field(nested), "");
        // GetUserRequest's `lookup` is a oneof, not a field: which arm was bad is not known.
        let oneof = "failed to decode Protobuf message: GetUserRequest.lookup: invalid string \
                     value: data is not UTF-8 encoded";
        assert_eq!(undecodable_field(oneof), "");
        let billing = "failed to decode Protobuf message: CreateSubscriptionRequest.offer_id: \
                       invalid string value: data is not UTF-8 encoded";
        assert_eq!(undecodable_field(billing), "offer_id");
        assert_eq!(
            undecodable_field("failed to decode Protobuf message: buffer underflow"),
            ""
        );
        assert_eq!(undecodable_field("Missing request message."), "");
        assert_eq!(undecodable_field(""), "");
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(
            parse_grpc_timeout("1999m"),
            Some(Duration::from_millis(1999))
        );
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("100u"), Some(Duration::from_micros(100)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789m"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
    }
}
