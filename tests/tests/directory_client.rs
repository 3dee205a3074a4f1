//! The HTTP/2 client settings billing uses towards the directory (`platform::client`), against
//! servers that misbehave in the ways a slow or dying directory does: answers arriving in a
//! burst before anyone reads them, answers arriving after their callers gave up, a GOAWAY
//! before the call was processed, nothing listening, a TLS handshake that never completes.
//! The servers here speak HTTP/2 by hand (h2's server, or raw frames) so that each
//! misbehaviour is exact.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use integration_tests::contract::directory::v1 as dpb;
use integration_tests::contract::directory::v1::directory_service_client::DirectoryServiceClient;
use integration_tests::platform;
use tokio::net::TcpStream;
use tonic::transport::Channel;

fn client(url: &str, connect_timeout: Duration) -> DirectoryServiceClient<Channel> {
    let endpoint = platform::client::endpoint(url, connect_timeout, None).expect("endpoint");
    DirectoryServiceClient::new(platform::client::lazy_channel(&endpoint))
}

async fn listener() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    (listener, url)
}

/// Hundreds of answers that arrive together, before any caller has read its own, do not end
/// the connection: h2's budget for small DATA frames is half the connection window, and at
/// HTTP/2's default window about 130 unread answers closed it with ENHANCE_YOUR_CALM and
/// failed every call on it.
#[tokio::test]
async fn a_burst_of_answers_read_late_keeps_the_connection() {
    const CALLS: usize = 600;
    let (listener, url) = listener().await;
    // A directory that answers only once every call has arrived, all at once.
    let replica = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.expect("accept");
        // The windows of a tonic (hyper) server: 1 MiB. h2's own default (64 KiB) would end
        // the connection at about 130 unread requests, each a small DATA frame.
        let mut connection = h2::server::Builder::new()
            .initial_connection_window_size(1 << 20)
            .initial_window_size(1 << 20)
            .handshake::<_, Bytes>(socket)
            .await
            .expect("handshake");
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
    let client = client(&url, Duration::from_secs(5));
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..CALLS {
        let mut client = client.clone();
        calls.spawn(async move {
            client
                .authorize(dpb::AuthorizeRequest {
                    action: 1,
                    ..Default::default()
                })
                .await
        });
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

/// A directory that speaks raw HTTP/2 frames: it answers a call with action 2 at once, and a
/// call with action 1 only once the caller has given up on it (its RST_STREAM arrived), as a
/// late answer reaches a caller whose deadline passed. It reports each action-1 call it has
/// read. It ignores flow control: the client's requests stay within the default 64 KiB
/// window, and the client's own large windows take the answers.
async fn answer_after_the_caller_gave_up(
    mut socket: TcpStream,
    seen: tokio::sync::mpsc::UnboundedSender<u32>,
) -> std::io::Result<()> {
    use raw::{ACK, DATA, END_HEADERS, END_STREAM, HEADERS, PING, RST_STREAM, SETTINGS, frame};
    // `:status: 200` (static entry 8) and `content-type: application/grpc` (a literal with the
    // static name 31); the message `allowed: true`; `grpc-status: 0` (a literal).
    let mut head = vec![0x88, 0x0f, 0x10, 16];
    head.extend_from_slice(b"application/grpc");
    let message = [0, 0, 0, 0, 2, 0x08, 0x01];
    let mut trailers = vec![0x00, 11];
    trailers.extend_from_slice(b"grpc-status");
    trailers.extend_from_slice(&[1, b'0']);
    let answer = |out: &mut Vec<u8>, stream: u32| {
        frame(out, HEADERS, END_HEADERS, stream, &head);
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
            DATA if payload.ends_with(&[0x08, 0x02]) => answer(&mut out, stream),
            DATA if payload.ends_with(&[0x08, 0x01]) => {
                let _ = seen.send(stream);
            }
            // The caller gave up (CANCEL): answer late, once. Not the client's resets of a
            // late answer (STREAM_CLOSED), which would start a loop.
            RST_STREAM if payload == [0, 0, 0, 8] => answer(&mut out, stream),
            _ => {}
        }
        raw::write(&mut socket, &out).await?;
    }
}

/// Answers that arrive after their callers gave up do not end the connection. With h2's
/// defaults it remembers 50 streams it reset, for a second; a frame for a stream it does not
/// remember makes it reset that stream again, and after 1,024 such resets in a connection's
/// life it ends the connection with GOAWAY ENHANCE_YOUR_CALM ("too_many_internal_resets").
/// 3,000 calls given up here, 100 at a time, each answered late: with the defaults at least
/// 1,500 resets again, and the connection would be gone.
#[tokio::test]
async fn late_answers_to_calls_given_up_keep_the_connection() {
    const WAVE: usize = 100;
    const WAVES: usize = 30;
    let (listener, url) = listener().await;
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let accepted = Arc::new(AtomicU64::new(0));
    let replica = {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(answer_after_the_caller_gave_up(socket, seen_tx.clone()));
            }
        })
    };
    let client = client(&url, Duration::from_secs(5));
    let given_up = async {
        for _ in 0..WAVES {
            let mut calls = tokio::task::JoinSet::new();
            for _ in 0..WAVE {
                let mut client = client.clone();
                calls.spawn(async move {
                    client
                        .authorize(dpb::AuthorizeRequest {
                            action: 1,
                            ..Default::default()
                        })
                        .await
                });
            }
            // Each call reached the directory before its caller gives up.
            for _ in 0..WAVE {
                seen.recv().await.expect("the directory reports each call");
            }
            calls.shutdown().await;
        }
    };
    // A connection that ended mid-wave leaves calls the directory never saw.
    tokio::time::timeout(Duration::from_secs(30), given_up)
        .await
        .expect("every call reached the directory");
    // Sent after the last late answers, so it is answered after them.
    let mut client = client.clone();
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        client.authorize(dpb::AuthorizeRequest {
            action: 2,
            ..Default::default()
        }),
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

/// A replica that refuses a call with GOAWAY before processing it: the call fails with a
/// status the client made itself (it carries the transport's error as its source, which is how
/// billing tells "no answer" from an answer), and the next call opens a new connection.
#[tokio::test]
async fn a_goaway_before_the_call_was_processed_fails_the_call_and_reconnects() {
    let (listener, url) = listener().await;
    let accepted = Arc::new(AtomicU64::new(0));
    let replica = tokio::spawn(replica_that_goes_away(listener, accepted.clone()));
    let mut client = client(&url, Duration::from_secs(1));
    for call in 1..=2 {
        let status = client
            .authorize(dpb::AuthorizeRequest {
                action: 1,
                ..Default::default()
            })
            .await
            .expect_err("the replica refuses every call");
        assert!(
            std::error::Error::source(&status).is_some(),
            "a status made by the client, not an answer: {status:?}"
        );
        // The channel notices the connection is gone before the next call.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            accepted.load(Ordering::SeqCst) >= call,
            "a new connection for call {call}"
        );
    }
    replica.abort();
}

/// Nothing listens: the call fails at once as UNAVAILABLE (never sent, safe to retry), and
/// the next call tries to connect again.
#[tokio::test]
async fn a_refused_connection_is_unavailable_and_tried_again() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let mut client = client(&url, Duration::from_secs(1));
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let status = client
            .authorize(dpb::AuthorizeRequest {
                action: 1,
                ..Default::default()
            })
            .await
            .expect_err("nothing listens");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}

/// A replica that accepts TCP but never answers the TLS handshake: the call fails within the
/// connect timeout with a status the client made (tonic says UNKNOWN "transport error", with
/// the timeout as its source), and the handshake is not left holding the channel: the next
/// call tries again.
#[tokio::test]
async fn a_tls_handshake_that_never_completes_is_cut_off_at_the_connect_timeout() {
    let (listener, _) = listener().await;
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
    let ca =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a certificate");
    let tls = platform::tls::ClientTls {
        ca_pem: Some(ca.cert.pem().into_bytes()),
        identity: None,
    };
    let url = format!("https://localhost:{port}");
    let endpoint =
        platform::client::endpoint(&url, Duration::from_millis(300), Some(&tls)).expect("endpoint");
    let mut client = DirectoryServiceClient::new(platform::client::lazy_channel(&endpoint));
    for attempt in 1..=2 {
        let started = std::time::Instant::now();
        let status = tokio::time::timeout(
            Duration::from_secs(5),
            client.authorize(dpb::AuthorizeRequest {
                action: 1,
                ..Default::default()
            }),
        )
        .await
        .expect("cut off at the connect timeout")
        .expect_err("the handshake never completes");
        assert!(
            std::error::Error::source(&status).is_some(),
            "a status made by the client, not an answer: {status:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            attempt,
            "one attempt per call"
        );
    }
    silent.abort();
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
        let mut payload = vec![0u8; usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c)];
        socket.read_exact(&mut payload).await?;
        Ok((kind, flags, stream, payload))
    }

    pub async fn write(socket: &mut TcpStream, out: &[u8]) -> std::io::Result<()> {
        socket.write_all(out).await
    }
}
