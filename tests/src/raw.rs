//! gRPC calls made by hand over HTTP/2 (the `h2` crate, no gRPC client), for tests that must
//! see exactly what a server sent: a client library runs its own timer for a deadline and
//! reports its own status when that fires first, and hides compression.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

/// One gRPC call's answer as it came off the wire.
#[derive(Debug)]
pub struct Answer {
    pub headers: http::HeaderMap,
    /// The response body: length-prefixed messages.
    pub data: Vec<u8>,
    /// The status: from the trailers, or from the headers of a trailers-only answer.
    pub status: tonic::Status,
}

impl Answer {
    /// The first message's compressed flag (the byte before its length).
    pub fn compressed_flag(&self) -> u8 {
        assert!(self.data.len() >= 5, "no message in {self:?}");
        self.data[0]
    }

    /// The ErrorInfo reason and domain.
    pub fn reason(&self) -> (String, String) {
        let (reason, domain, _) = crate::details(&self.status);
        (reason, domain)
    }
}

/// `message` as one gRPC frame: the compressed flag, the length, the bytes.
pub fn framed(compressed: bool, message: &[u8]) -> Vec<u8> {
    let mut body = vec![u8::from(compressed)];
    body.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    body.extend_from_slice(message);
    body
}

/// Sends one gRPC request over a new HTTP/2 connection, with `headers` besides the usual ones;
/// `message` is framed uncompressed.
pub async fn raw_call(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    message: &[u8],
) -> Answer {
    raw_call_with_body(addr, path, headers, framed(false, message)).await
}

/// As [`raw_call`], with the request body as given.
pub async fn raw_call_with_body(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Answer {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.expect("connection ready");
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, mut stream) = client
        .send_request(request.body(()).expect("request"), false)
        .expect("send request");
    stream
        .send_data(Bytes::from(body), true)
        .expect("send body");
    let answer = async {
        let (head, mut body) = response.await.expect("response").into_parts();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("body");
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.expect("trailers");
        let status = tonic::Status::from_header_map(&head.headers)
            .or_else(|| trailers.as_ref().and_then(tonic::Status::from_header_map))
            .expect("a grpc-status in the headers or trailers");
        Answer {
            headers: head.headers,
            data,
            status,
        }
    };
    tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .unwrap_or_else(|_| panic!("{path}: no answer within 10 s"))
}
