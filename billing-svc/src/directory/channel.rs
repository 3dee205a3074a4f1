//! A gRPC channel to one directory replica over one HTTP/2 connection, driven through `h2`
//! directly. The load generator (`tests/src/loadgen`) sends its load over it too, for the
//! same reason (docs/decisions/directory-h2-channel.md).
//!
//! tonic's `Channel` puts a `tower::Buffer` in front of hyper's client: every call is handed
//! to the buffer's task, which hands it to hyper's connection task, which spawns a task per
//! call to stream the request body. Billing makes one Authorize call for every call it
//! answers, so each of those hand-offs (a task wake-up, often on the other core) is paid on
//! every purchase and read. Here the calling task opens the stream itself, sends the whole
//! (already encoded, one-message) request body with it, and reads the answer from the
//! stream; the only other task is the one that drives the connection's socket.
//!
//! What the channel does besides: connects lazily on the first call (so billing starts while
//! the directory is down), one connection attempt at a time, within a connect timeout;
//! notices a connection that closed (GOAWAY, a reset, a failed keepalive ping) and opens a
//! new one on the next call; pings the server every 20 s and drops a connection that does not
//! answer within 5 s; speaks TLS (ALPN h2, optionally with a client certificate) when
//! configured. Calls beyond the server's limit of concurrent streams wait in h2's queue until
//! a stream closes (a tonic server sets no limit unless configured to).
//!
//! Errors that mean the call was never sent or never processed (no connection, GOAWAY,
//! REFUSED_STREAM) are `UNAVAILABLE` statuses; other errors after it was sent are `h2` errors,
//! which tonic maps to a status (a reset, a broken connection). The caller (`GrpcDirectory`)
//! decides what to retry.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body as _, Frame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection's receive window, across its streams (h2's default is 64 KiB), and each
/// stream's (a page of a thousand users is about 200 KB), so that answers in flight at once
/// never wait for window updates.
const CONNECTION_WINDOW: u32 = 8 << 20;
const STREAM_WINDOW: u32 = 1 << 20;

/// A cheap-to-clone handle on one replica's connection.
#[derive(Clone)]
pub struct H2Channel {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for H2Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Channel")
            .field("address", &self.shared.address)
            .field("tls", &self.shared.tls.is_some())
            .finish()
    }
}

struct Shared {
    /// `host:port`, as the socket connects to it.
    address: String,
    tls: Option<Arc<Tls>>,
    connect_timeout: Duration,
    /// The connection calls go on, once one is open.
    live: Mutex<Option<Live>>,
    /// One connection attempt at a time; the callers waiting share its outcome.
    connecting: Arc<tokio::sync::Mutex<()>>,
    /// How many connection attempts have failed; a caller that waited behind an attempt
    /// that failed reports that failure instead of trying again at once.
    failures: AtomicU64,
}

struct Tls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

#[derive(Clone)]
struct Live {
    sender: h2::client::SendRequest<Bytes>,
    /// Set by the connection's task when the connection has ended.
    closed: Arc<AtomicBool>,
}

/// Where one replica is and how to reach it: its URL (the origin of every call), its socket
/// address and, for `https://`, the TLS settings (built once, shared by its connections).
#[derive(Clone)]
pub struct Target {
    origin: http::Uri,
    address: String,
    tls: Option<Arc<Tls>>,
}

impl Target {
    /// From a directory URL, `http://host:port`, or `https://host:port` with `tls`.
    pub fn parse(url: &str, tls: Option<&platform::tls::ClientTls>) -> anyhow::Result<Self> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("invalid directory URL {url:?}: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => anyhow::bail!("directory URL {url:?} must start with http:// or https://"),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow::anyhow!("directory URL {url:?} has no host"))?;
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host = authority.host();
        let tls = match (https, tls) {
            (true, Some(tls)) => Some(Arc::new(tls_connector(tls, host)?)),
            (true, None) => anyhow::bail!(
                "directory URL {url:?} is https:// but no TLS settings were given (--directory-ca)"
            ),
            (false, _) => None,
        };
        Ok(Self {
            address: format!("{host}:{port}"),
            tls,
            origin: uri,
        })
    }

    /// The scheme and authority every call's URI gets (tonic's `with_origin`).
    pub fn origin(&self) -> http::Uri {
        self.origin.clone()
    }
}

impl H2Channel {
    /// A channel that connects on its first call.
    pub fn lazy(target: &Target, connect_timeout: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                address: target.address.clone(),
                tls: target.tls.clone(),
                connect_timeout,
                live: Mutex::new(None),
                connecting: Arc::new(tokio::sync::Mutex::new(())),
                failures: AtomicU64::new(0),
            }),
        }
    }
}

fn tls_connector(tls: &platform::tls::ClientTls, host: &str) -> anyhow::Result<Tls> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    if let Some(ca) = &tls.ca_pem {
        for cert in CertificateDer::pem_slice_iter(ca) {
            let cert = cert.map_err(|e| anyhow::anyhow!("the directory CA is not PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| anyhow::anyhow!("the directory CA is not a valid certificate: {e}"))?;
        }
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "TLS towards the directory needs a CA to trust (--directory-ca)"
    );
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("TLS towards the directory: {e}"))?
        .with_root_certificates(roots);
    let mut config = match &tls.identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("the client certificate is not PEM: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| anyhow::anyhow!("the client key is not PEM: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| anyhow::anyhow!("the client certificate and key: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let server_name = ServerName::try_from(host.to_owned())
        .map_err(|e| anyhow::anyhow!("{host:?} is not a TLS server name: {e}"))?;
    Ok(Tls {
        connector: TlsConnector::from(Arc::new(config)),
        server_name,
    })
}

fn unavailable(message: String) -> BoxError {
    Box::new(tonic::Status::unavailable(message))
}

impl Shared {
    fn current(&self) -> Option<Live> {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.as_ref()
            .filter(|l| !l.closed.load(Ordering::Acquire))
            .cloned()
    }

    fn forget(&self, dead: &Live) {
        dead.closed.store(true, Ordering::Release);
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if live
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(&l.closed, &dead.closed))
        {
            *live = None;
        }
    }

    /// A sender that can open a stream on a live connection, and that connection.
    async fn ready_sender(
        self: &Arc<Self>,
    ) -> Result<(h2::client::SendRequest<Bytes>, Live), BoxError> {
        if let Some(live) = self.current() {
            match live.sender.clone().ready().await {
                Ok(sender) => return Ok((sender, live)),
                Err(_) => self.forget(&live),
            }
        }
        let live = self.connect_once().await?;
        match live.sender.clone().ready().await {
            Ok(sender) => Ok((sender, live)),
            Err(e) => {
                self.forget(&live);
                Err(unavailable(format!(
                    "the connection to {} closed: {e}",
                    self.address
                )))
            }
        }
    }

    /// The live connection, opening one if there is none. The attempt runs in a task of its
    /// own that holds the turn, so a caller that gives up (its deadline passed) does not
    /// cancel it, and the callers queued behind it get its outcome instead of starting over.
    async fn connect_once(self: &Arc<Self>) -> Result<Live, BoxError> {
        let failures = self.failures.load(Ordering::Acquire);
        let turn = self.connecting.clone().lock_owned().await;
        if let Some(live) = self.current() {
            return Ok(live);
        }
        if self.failures.load(Ordering::Acquire) != failures {
            return Err(unavailable(format!("cannot connect to {}", self.address)));
        }
        let shared = self.clone();
        let attempt = tokio::spawn(async move {
            let _turn = turn;
            let outcome = match tokio::time::timeout(shared.connect_timeout, shared.connect()).await
            {
                Ok(Ok(live)) => {
                    *shared.live.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(live.clone());
                    Ok(live)
                }
                Ok(Err(e)) => Err(format!("cannot connect to {}: {e}", shared.address)),
                Err(_) => Err(format!(
                    "connecting to {} took over {} ms",
                    shared.address,
                    shared.connect_timeout.as_millis()
                )),
            };
            if outcome.is_err() {
                shared.failures.fetch_add(1, Ordering::AcqRel);
            }
            outcome
        });
        match attempt.await {
            Ok(Ok(live)) => Ok(live),
            Ok(Err(message)) => Err(unavailable(message)),
            Err(e) => Err(unavailable(format!(
                "connecting to {} failed: {e}",
                self.address
            ))),
        }
    }

    async fn connect(&self) -> Result<Live, BoxError> {
        let tcp = TcpStream::connect(&self.address).await?;
        // Small frames (a call, a ping) must not wait for the peer's delayed ACK.
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => start(tcp).await,
            Some(tls) => {
                let stream = tls.connector.connect(tls.server_name.clone(), tcp).await?;
                if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err("the directory did not agree to HTTP/2 (ALPN h2)".into());
                }
                start(stream).await
            }
        }
    }
}

/// The HTTP/2 handshake, and a task that drives the connection until it ends.
async fn start<T>(io: T) -> Result<Live, BoxError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, mut connection) = h2::client::Builder::new()
        .enable_push(false)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .initial_window_size(STREAM_WINDOW)
        // h2 closes a connection (GOAWAY ENHANCE_YOUR_CALM, "too_many_data_frames") once its
        // budget for small DATA frames is spent: each small frame received costs 256 bytes less
        // its length, given back only when the caller reads it. At the default budget (half the
        // connection window) a burst of about 130 answers arriving before their callers ran
        // ended the connection and failed every call on it. And an answer that arrives after
        // its caller gave up (a deadline, a cancelled call) is charged and never given back
        // (h2 0.4.20), so any finite budget ends a long-lived connection sooner or later. The
        // guard is against a hostile server; this one is our own directory (or the server the
        // load generator measures), and flow control still bounds the bytes it can send unread.
        .data_frame_budget(usize::MAX)
        // A frame for a stream h2 reset and no longer remembers (it remembers at most 50 at a
        // time, each for a second; a reset made while 50 are remembered is not) makes it reset
        // that stream again, and by default a connection ends (GOAWAY ENHANCE_YOUR_CALM,
        // "too_many_internal_resets") after 1,024 such resets in its life (h2 0.4.20: the count
        // never goes down). Late answers to calls whose callers gave up are such frames, one to
        // three resets per answer: after some 340 to 1,024 timed-out calls every call on the
        // connection would fail, and they come in numbers exactly when the directory is slow.
        // So no limit, as with the budget above. What that gives up: a peer that keeps sending
        // frames for closed streams makes this client send a reset for each, without bound.
        // The peer is our own directory (or the server the load generator measures), which
        // answers a call once and never answers a reset.
        .max_local_error_reset_streams(None)
        .handshake::<T, Bytes>(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let ping = connection.ping_pong();
    let ended = closed.clone();
    tokio::spawn(async move {
        let outcome = drive(&mut connection, ping).await;
        ended.store(true, Ordering::Release);
        match outcome {
            Ok(()) => tracing::debug!("directory connection closed"),
            Err(e) => tracing::debug!(error = %e, "directory connection ended"),
        }
    });
    Ok(Live { sender, closed })
}

/// Polls the connection (its socket's reads and writes) and pings the server every
/// `KEEPALIVE_INTERVAL`; a ping not answered within `KEEPALIVE_TIMEOUT` ends it.
async fn drive<T>(
    connection: &mut h2::client::Connection<T, Bytes>,
    ping: Option<h2::PingPong>,
) -> Result<(), BoxError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let Some(mut ping) = ping else {
        return Ok(connection.await?);
    };
    loop {
        tokio::select! {
            ended = &mut *connection => return Ok(ended?),
            () = tokio::time::sleep(KEEPALIVE_INTERVAL) => {}
        }
        let pong = tokio::time::timeout(KEEPALIVE_TIMEOUT, ping.ping(h2::Ping::opaque()));
        tokio::select! {
            ended = &mut *connection => return Ok(ended?),
            answered = pong => match answered {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err("the directory did not answer a keepalive ping".into()),
            },
        }
    }
}

/// Reads a request body to its end: for a unary call, the one encoded message.
async fn collect(mut body: tonic::body::Body) -> Result<Bytes, BoxError> {
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        match &first {
            None if rest.is_empty() => first = Some(data),
            _ => {
                if let Some(first) = first.take() {
                    rest.extend_from_slice(&first);
                }
                rest.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| rest.freeze()))
}

impl tower::Service<http::Request<tonic::body::Body>> for H2Channel {
    type Response = http::Response<H2Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness (a connection, a free stream) is awaited in the call itself, so a
        // channel shared by many callers never holds a reservation for one of them.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let data = collect(body).await?;
            let (mut sender, live) = shared.ready_sender().await?;
            let head = http::Request::from_parts(parts, ());
            // Refused before anything was sent (the server said GOAWAY since the sender was
            // ready): the call is safe to make again, on a new connection.
            let (response, mut stream) = match sender.send_request(head, data.is_empty()) {
                Ok(opened) => opened,
                Err(e) if e.is_go_away() || e.is_io() => {
                    shared.forget(&live);
                    return Err(unavailable(format!(
                        "the connection to {} refused a new call: {e}",
                        shared.address
                    )));
                }
                Err(e) => return Err(e.into()),
            };
            if !data.is_empty() {
                // Fails only if the stream was already refused or reset, which the response
                // reports with its cause.
                let _ = stream.send_data(data, true);
            }
            let response = match response.await {
                Ok(response) => response,
                // Refused unprocessed: the server's GOAWAY named an earlier last stream, or
                // REFUSED_STREAM. Safe to make again (and Authorize changes nothing anyway).
                Err(e) if e.is_go_away() && e.is_remote() => {
                    shared.forget(&live);
                    return Err(unavailable(format!(
                        "{} went away before answering: {e}",
                        shared.address
                    )));
                }
                Err(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
                    return Err(unavailable(format!(
                        "{} refused the call: {e}",
                        shared.address
                    )));
                }
                Err(e) => return Err(e.into()),
            };
            Ok(response.map(|recv| H2Body {
                recv,
                trailers: false,
            }))
        })
    }
}

/// An answer's body: its data frames, then its trailers (where gRPC puts the status).
#[derive(Debug)]
pub struct H2Body {
    recv: h2::RecvStream,
    /// Whether the data is done and the trailers are next.
    trailers: bool,
}

impl http_body::Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.trailers {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Give the window back as the data is taken, so long answers keep flowing.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.trailers = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contract::directory::v1 as dpb;
    use contract::directory::v1::directory_service_client::DirectoryServiceClient;

    #[test]
    fn targets_come_from_directory_urls() {
        let plain = Target::parse("http://127.0.0.1:50051", None).expect("plain");
        assert_eq!(plain.address, "127.0.0.1:50051");
        assert!(plain.tls.is_none());
        let default_port = Target::parse("http://directory", None).expect("no port");
        assert_eq!(default_port.address, "directory:80");
        let v6 = Target::parse("http://[::1]:7000", None).expect("IPv6");
        assert_eq!(v6.address, "[::1]:7000");

        let refused = |url: &str, tls: Option<&platform::tls::ClientTls>| {
            Target::parse(url, tls)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(refused("ftp://host:1", None).contains("http://"));
        assert!(refused("127.0.0.1:50051", None).contains("http://"));
        assert!(refused("https://localhost:1", None).contains("--directory-ca"));
        let no_ca = platform::tls::ClientTls {
            ca_pem: None,
            identity: None,
        };
        assert!(refused("https://localhost:1", Some(&no_ca)).contains("--directory-ca"));
        let garbage = platform::tls::ClientTls {
            ca_pem: Some(b"not a certificate".to_vec()),
            identity: None,
        };
        assert!(refused("https://localhost:1", Some(&garbage)).contains("--directory-ca"));
    }

    /// A replica that accepts TCP but never answers the TLS handshake: the first caller
    /// gives up (its deadline) long before the connect timeout, and the attempt it started
    /// carries on in its own task; the next caller waits for that attempt's outcome instead
    /// of opening a second connection.
    #[tokio::test]
    async fn a_caller_giving_up_does_not_cancel_the_connection_attempt() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        });
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a certificate");
        let tls = platform::tls::ClientTls {
            ca_pem: Some(ca.cert.pem().into_bytes()),
            identity: None,
        };
        let url = format!("https://localhost:{port}");
        let target = Target::parse(&url, Some(&tls)).expect("target");
        let channel = H2Channel::lazy(&target, Duration::from_millis(600));
        let mut client = DirectoryServiceClient::with_origin(channel, target.origin());

        let first = tokio::time::timeout(
            Duration::from_millis(50),
            client.authorize(dpb::AuthorizeRequest { action: 1 }),
        )
        .await;
        assert!(first.is_err(), "the first caller gave up: {first:?}");
        let status = client
            .authorize(dpb::AuthorizeRequest { action: 1 })
            .await
            .expect_err("the handshake never completes");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection attempt, shared by both callers"
        );
        silent.abort();
    }

    /// A fake replica that speaks just enough HTTP/2 to take a call, then refuses it with
    /// GOAWAY(last stream 0, NO_ERROR): "I processed nothing, go elsewhere". It answers every
    /// connection the same way and counts them.
    async fn replica_that_goes_away(listener: tokio::net::TcpListener, accepted: Arc<AtomicU64>) {
        while let Ok((socket, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(go_away_at_every_call(socket));
        }
    }

    async fn go_away_at_every_call(mut socket: TcpStream) -> std::io::Result<()> {
        raw::handshake(&mut socket).await?;
        loop {
            let (kind, flags, _, _) = raw::read_frame(&mut socket).await?;
            let mut out = Vec::new();
            match kind {
                raw::SETTINGS if flags & raw::ACK == 0 => raw::settings_ack(&mut out),
                // Last stream id 0 (nothing processed), error code NO_ERROR.
                raw::HEADERS => raw::frame(&mut out, raw::GOAWAY, 0, 0, &[0; 8]),
                _ => {}
            }
            raw::write(&mut socket, &out).await?;
        }
    }

    /// A replica that refuses a call with GOAWAY before processing it: the call is UNAVAILABLE
    /// (never processed, safe to make elsewhere; tonic alone would say INTERNAL), and the
    /// connection is dropped, so the next call opens a new one.
    #[tokio::test]
    async fn a_goaway_before_the_call_was_processed_is_unavailable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let accepted = Arc::new(AtomicU64::new(0));
        let replica = tokio::spawn(replica_that_goes_away(listener, accepted.clone()));
        let target = Target::parse(&url, None).expect("target");
        let channel = H2Channel::lazy(&target, Duration::from_secs(1));
        let mut client = DirectoryServiceClient::with_origin(channel, target.origin());
        for call in 1..=2 {
            let status = client
                .authorize(dpb::AuthorizeRequest { action: 1 })
                .await
                .expect_err("the replica refuses every call");
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(status.message().contains("went away"), "{status:?}");
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                call,
                "a new connection per call"
            );
        }
        replica.abort();
    }

    /// Hundreds of answers that arrive together, before any caller has read its own, do not
    /// end the connection: with h2's default budget for small DATA frames, about 130 unread
    /// answers closed it with ENHANCE_YOUR_CALM and failed every call on it.
    #[tokio::test]
    async fn a_burst_of_answers_read_late_keeps_the_connection() {
        const CALLS: usize = 600;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        // A directory that answers only once every call has arrived, all at once.
        let replica = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            let mut connection = h2::server::handshake(socket).await.expect("handshake");
            let mut waiting = Vec::new();
            while waiting.len() < CALLS {
                let Some(Ok((_request, respond))) = connection.accept().await else {
                    return;
                };
                waiting.push(respond);
            }
            let answer = dpb::AuthorizeResponse {
                allowed: true,
                ..Default::default()
            };
            let mut message = vec![0; 5];
            prost::Message::encode(&answer, &mut message).expect("encode");
            let len = u32::try_from(message.len() - 5).expect("small");
            message[1..5].copy_from_slice(&len.to_be_bytes());
            for mut respond in waiting {
                let head = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(())
                    .expect("response");
                let mut stream = respond.send_response(head, false).expect("headers");
                stream
                    .send_data(Bytes::from(message.clone()), false)
                    .expect("data");
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                stream.send_trailers(trailers).expect("trailers");
            }
            while connection.accept().await.is_some() {}
        });
        let target = Target::parse(&url, None).expect("target");
        let channel = H2Channel::lazy(&target, Duration::from_secs(5));
        let client = DirectoryServiceClient::with_origin(channel, target.origin());
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..CALLS {
            let mut client = client.clone();
            calls.spawn(async move { client.authorize(dpb::AuthorizeRequest { action: 1 }).await });
        }
        let answers = tokio::time::timeout(Duration::from_secs(20), calls.join_all())
            .await
            .expect("every call answered");
        for answer in answers {
            let answer = answer.expect("answered OK");
            assert!(answer.into_inner().allowed);
        }
        replica.abort();
    }

    /// A directory that speaks raw HTTP/2 frames: it answers a call with action 2 at once, and
    /// a call with action 1 only once the caller has given up on it (its RST_STREAM arrived),
    /// as a late answer reaches a caller whose deadline passed; a late answer starts with
    /// `small_frames` DATA frames of one byte. It reports each action-1 call it has read. It
    /// ignores flow control: the client's requests stay within the default 64 KiB window, and
    /// the client's own large windows take the answers.
    async fn answer_after_the_caller_gave_up(
        mut socket: TcpStream,
        seen: tokio::sync::mpsc::UnboundedSender<u32>,
        small_frames: usize,
    ) -> std::io::Result<()> {
        use raw::{ACK, DATA, END_HEADERS, END_STREAM, HEADERS, PING, RST_STREAM, SETTINGS, frame};
        // `:status: 200` (static entry 8) and `content-type: application/grpc` (a literal with
        // the static name 31); the message `allowed: true`; `grpc-status: 0` (a literal).
        let mut head = vec![0x88, 0x0f, 0x10, 16];
        head.extend_from_slice(b"application/grpc");
        let message = [0, 0, 0, 0, 2, 0x08, 0x01];
        let mut trailers = vec![0x00, 11];
        trailers.extend_from_slice(b"grpc-status");
        trailers.extend_from_slice(&[1, b'0']);
        let answer = |out: &mut Vec<u8>, stream: u32, small_frames: usize| {
            frame(out, HEADERS, END_HEADERS, stream, &head);
            for _ in 0..small_frames {
                frame(out, DATA, 0, stream, &[0]);
            }
            frame(out, DATA, 0, stream, &message);
            frame(out, HEADERS, END_HEADERS | END_STREAM, stream, &trailers);
        };
        raw::handshake(&mut socket).await?;
        let mut out = Vec::new();
        loop {
            let (kind, flags, stream, payload) = raw::read_frame(&mut socket).await?;
            out.clear();
            match kind {
                SETTINGS if flags & ACK == 0 => raw::settings_ack(&mut out),
                PING if flags & ACK == 0 => frame(&mut out, PING, ACK, 0, &payload),
                // The request message: `action: 2` is answered now, `action: 1` once given up.
                DATA if payload.ends_with(&[0x08, 0x02]) => answer(&mut out, stream, 0),
                DATA if payload.ends_with(&[0x08, 0x01]) => {
                    let _ = seen.send(stream);
                }
                // The caller gave up (CANCEL): answer late, once. Not the client's resets of a
                // late answer (STREAM_CLOSED), which would start a loop.
                RST_STREAM if payload == [0, 0, 0, 8] => answer(&mut out, stream, small_frames),
                _ => {}
            }
            raw::write(&mut socket, &out).await?;
        }
    }

    /// Answers that arrive after their callers gave up do not end the connection. h2 remembers
    /// at most 50 streams it reset at a time; a frame for a stream it does not remember makes
    /// it reset that stream again, and after 1,024 such resets in a connection's life it ends
    /// the connection with GOAWAY ENHANCE_YOUR_CALM ("too_many_internal_resets", h2 0.4.20).
    #[tokio::test]
    async fn late_answers_to_calls_given_up_keep_the_connection() {
        // 3,000 calls given up, 100 at a time, each answered once: at least 50 of each wave
        // are not remembered however fast the waves go, so at least 1,500 resets again.
        give_up_calls_then_call_again(100, 30, 0).await;
    }

    /// Small frames of late answers do not end the connection either. While h2 remembers a
    /// stream it reset, it charges each small DATA frame for it to the connection's budget
    /// for small frames and never gives it back (h2 0.4.20), so at the default budget (half
    /// the connection window) late answers would end the connection with GOAWAY
    /// ENHANCE_YOUR_CALM ("too_many_data_frames"): after about 16,800 one-frame answers (at
    /// most 50 a second: minutes of timeouts), or here, at once, after 50 answers of 401
    /// frames.
    #[tokio::test]
    async fn small_frames_of_late_answers_keep_the_connection() {
        give_up_calls_then_call_again(50, 1, 400).await;
    }

    /// Makes `waves` x `wave` calls that their callers give up once the directory has read
    /// them (it answers each then, after `small_frames` DATA frames of one byte), then one call
    /// answered at once, which must succeed on the same connection.
    async fn give_up_calls_then_call_again(wave: usize, waves: usize, small_frames: usize) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let accepted = Arc::new(AtomicU64::new(0));
        let replica = {
            let accepted = accepted.clone();
            tokio::spawn(async move {
                while let Ok((socket, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let seen = seen_tx.clone();
                    tokio::spawn(answer_after_the_caller_gave_up(socket, seen, small_frames));
                }
            })
        };
        let target = Target::parse(&url, None).expect("target");
        let channel = H2Channel::lazy(&target, Duration::from_secs(5));
        let client = DirectoryServiceClient::with_origin(channel, target.origin());
        let given_up = async {
            for _ in 0..waves {
                let mut calls = tokio::task::JoinSet::new();
                for _ in 0..wave {
                    let mut client = client.clone();
                    calls.spawn(async move {
                        client.authorize(dpb::AuthorizeRequest { action: 1 }).await
                    });
                }
                // Each call reached the directory before its caller gives up.
                for _ in 0..wave {
                    seen.recv().await.expect("the directory reports each call");
                }
                calls.shutdown().await;
            }
        };
        // A connection that ended mid-wave leaves calls the directory never saw.
        tokio::time::timeout(Duration::from_secs(20), given_up)
            .await
            .expect("every call reached the directory");
        // Sent after the last late answers, so it is answered after them.
        let mut client = client.clone();
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            client.authorize(dpb::AuthorizeRequest { action: 2 }),
        )
        .await
        .expect("answered in time")
        .expect("answered OK");
        assert!(answer.into_inner().allowed);
        // A connection that ended would have been replaced by the next call.
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection throughout"
        );
        replica.abort();
    }

    /// Nothing listens: the call fails at once as UNAVAILABLE (never sent, safe to retry),
    /// and the next call tries to connect again.
    #[tokio::test]
    async fn a_refused_connection_is_unavailable_and_tried_again() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        drop(listener);
        let target = Target::parse(&url, None).expect("target");
        let channel = H2Channel::lazy(&target, Duration::from_secs(1));
        let mut client = DirectoryServiceClient::with_origin(channel, target.origin());
        for _ in 0..2 {
            let started = std::time::Instant::now();
            let status = client
                .authorize(dpb::AuthorizeRequest { action: 1 })
                .await
                .expect_err("nothing listens");
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            // The OS's own refusal: each call made an attempt of its own (a caller that only
            // waited behind a failed attempt reports "cannot connect" without a cause).
            assert!(status.message().contains("cannot connect"), "{status:?}");
            assert!(status.message().contains("refused"), "{status:?}");
            assert!(started.elapsed() < Duration::from_secs(1));
        }
    }

    /// Just enough HTTP/2 framing for the hand-written servers above (RFC 9113, section 4).
    mod raw {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::TcpStream;

        pub const DATA: u8 = 0x0;
        pub const HEADERS: u8 = 0x1;
        pub const RST_STREAM: u8 = 0x3;
        pub const SETTINGS: u8 = 0x4;
        pub const PING: u8 = 0x6;
        pub const GOAWAY: u8 = 0x7;
        pub const ACK: u8 = 0x1;
        pub const END_STREAM: u8 = 0x1;
        pub const END_HEADERS: u8 = 0x4;

        /// Appends one frame to `out`.
        pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
            let [_, a, b, c] = u32::try_from(payload.len()).unwrap_or(0).to_be_bytes();
            out.extend_from_slice(&[a, b, c, kind, flags]);
            out.extend_from_slice(&stream.to_be_bytes());
            out.extend_from_slice(payload);
        }

        pub fn settings_ack(out: &mut Vec<u8>) {
            frame(out, SETTINGS, ACK, 0, &[]);
        }

        /// Reads the client's preface and sends the server's (empty) SETTINGS.
        pub async fn handshake(socket: &mut TcpStream) -> std::io::Result<()> {
            let mut preface = [0u8; 24];
            socket.read_exact(&mut preface).await?;
            let mut out = Vec::new();
            frame(&mut out, SETTINGS, 0, 0, &[]);
            socket.write_all(&out).await
        }

        /// The next frame: its type, flags, stream id and payload.
        pub async fn read_frame(socket: &mut TcpStream) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
            let mut header = [0u8; 9];
            socket.read_exact(&mut header).await?;
            let [a, b, c, kind, flags, s0, s1, s2, s3] = header;
            let stream = u32::from_be_bytes([s0 & 0x7f, s1, s2, s3]);
            let mut payload =
                vec![0u8; usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c)];
            socket.read_exact(&mut payload).await?;
            Ok((kind, flags, stream, payload))
        }

        pub async fn write(socket: &mut TcpStream, out: &[u8]) -> std::io::Result<()> {
            socket.write_all(out).await
        }
    }
}
