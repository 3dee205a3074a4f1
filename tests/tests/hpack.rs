//! The request id a service echoes in every answer goes on the wire as an HPACK literal that is
//! never indexed: each call's id is new, so adding it to the connection's dynamic table would
//! only evict the entries that do repeat, and h2 compares a header with every table entry of
//! the same name before it adds one (`platform::rpc::per_call_value`).
//!
//! Seen from a bare HTTP/2 client: three calls on one connection, with request ids A, A and B
//! (same length). Were the id indexed, the second answer would name it by its table index and
//! its header block would be shorter than the third's; sent as a literal each time, the second
//! and third blocks are the same size.

use std::time::Duration;

use integration_tests::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const HEADERS: u8 = 0x1;
const DATA: u8 = 0x0;
const SETTINGS: u8 = 0x4;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame");
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK string literal, not Huffman-coded.
fn string(s: &str) -> Vec<u8> {
    let len = u8::try_from(s.len()).expect("short string");
    assert!(len < 127);
    let mut out = vec![len];
    out.extend_from_slice(s.as_bytes());
    out
}

/// The header block of a health check: every field a literal without indexing, so the
/// server's decoder table stays empty and only its encoder's choices differ between calls.
fn health_check_block(request_id: &str) -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
    block.push(0x04); // :path, name from the static table, literal value
    block.extend(string("/grpc.health.v1.Health/Check"));
    block.push(0x01); // :authority
    block.extend(string("localhost"));
    block.extend([0x0f, 0x10]); // content-type (static index 31)
    block.extend(string("application/grpc"));
    for (name, value) in [("te", "trailers"), ("x-request-id", request_id)] {
        block.push(0x00);
        block.extend(string(name));
        block.extend(string(value));
    }
    block
}

/// Reads frames until the response HEADERS of `stream`, and returns its header block's size.
async fn response_block_len(tcp: &mut TcpStream, stream: u32) -> usize {
    loop {
        let mut head = [0u8; 9];
        tcp.read_exact(&mut head).await.expect("frame header");
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.expect("frame payload");
        if head[3] == HEADERS && id == stream {
            assert!(head[4] & END_HEADERS != 0, "no CONTINUATION expected");
            assert!(head[4] & 0x28 == 0, "no padding or priority expected");
            return len;
        }
    }
}

/// The header-block sizes of three answers on one new connection, to calls with request ids
/// A, A and B.
async fn three_answers(addr: std::net::SocketAddr) -> Vec<usize> {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    tcp.write_all(&hello).await.expect("preface");
    let mut sizes = Vec::new();
    for (stream, id) in [
        (1, "hpack-check-1"),
        (3, "hpack-check-1"),
        (5, "hpack-check-2"),
    ] {
        let mut call = frame(HEADERS, END_HEADERS, stream, &health_check_block(id));
        call.extend(frame(DATA, END_STREAM, stream, &[0, 0, 0, 0, 0]));
        tcp.write_all(&call).await.expect("call");
        let size =
            tokio::time::timeout(Duration::from_secs(5), response_block_len(&mut tcp, stream))
                .await
                .expect("an answer");
        sizes.push(size);
    }
    sizes
}

#[tokio::test]
async fn echoed_request_ids_are_never_indexed() {
    let db = TestDb::sqlite();
    let directory = DirectoryServer::start(&db).await;
    // The answers also carry a `date`, which h2 indexes: when the second turns between two
    // answers, the later one carries a new date literal. Three tries on new connections: a
    // turn of the second in each is all but impossible, an indexed request id fails each.
    let mut tries = Vec::new();
    for _ in 0..3 {
        let sizes = three_answers(directory.addr).await;
        // The id itself (13 characters, at least 9 bytes Huffman-coded) is in the second
        // answer: echoed, and as a literal.
        assert!(
            sizes[1] > 12,
            "the second answer has no request id literal (indexed, or not echoed): {sizes:?}"
        );
        if sizes[1] == sizes[2] {
            directory.stop().await;
            return;
        }
        tries.push(sizes);
    }
    panic!("a repeated request id was sent by table index: {tries:?}");
}
