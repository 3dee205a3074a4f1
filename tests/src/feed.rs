//! Reading WatchChanges streams of either service in tests.

use std::time::Duration;

use base64::Engine as _;
use contract::billing::v1 as bpb;
use contract::directory::v1 as dpb;
use tonic::Streaming;

/// How long a test waits for what must come.
pub const WAIT: Duration = Duration::from_secs(20);

/// A `Change` of either service.
pub trait Change: Send + 'static {
    fn is_bookmark(&self) -> bool;
    fn cursor(&self) -> &str;
}

impl Change for dpb::Change {
    fn is_bookmark(&self) -> bool {
        self.r#type == dpb::ChangeType::Bookmark as i32
    }
    fn cursor(&self) -> &str {
        &self.cursor
    }
}

impl Change for bpb::Change {
    fn is_bookmark(&self) -> bool {
        self.r#type == bpb::ChangeType::Bookmark as i32
    }
    fn cursor(&self) -> &str {
        &self.cursor
    }
}

/// The next message of `stream`, bookmark or change.
pub async fn next<T: Change>(stream: &mut Streaming<T>) -> T {
    match tokio::time::timeout(WAIT, stream.message()).await {
        Ok(Ok(Some(change))) => change,
        Ok(Ok(None)) => panic!("the stream ended"),
        Ok(Err(status)) => panic!("the stream failed: {status:?}"),
        Err(_) => panic!("nothing came within {WAIT:?}"),
    }
}

/// The next `n` changes of `stream`, bookmarks skipped.
pub async fn changes<T: Change>(stream: &mut Streaming<T>, n: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let change = next(stream).await;
        if !change.is_bookmark() {
            out.push(change);
        }
    }
    out
}

/// Reads `stream` until it ends with an error (within [`WAIT`]), and returns it.
pub async fn end_of<T: Change>(stream: &mut Streaming<T>) -> tonic::Status {
    let ended = async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    };
    tokio::time::timeout(WAIT, ended)
        .await
        .unwrap_or_else(|_| panic!("the stream did not end within {WAIT:?}"))
}

/// Asserts `status` has `code` and ErrorInfo `reason`.
#[track_caller]
pub fn assert_ended(status: &tonic::Status, code: tonic::Code, reason: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(crate::details(status).0, reason, "{status:?}");
}

/// The number a cursor carries (its first 8 bytes: the tests know the format; callers must
/// not).
pub fn seq(cursor: &str) -> i64 {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .expect("base64url cursor");
    i64::from_be_bytes(raw[..8].try_into().expect("8 bytes"))
}
