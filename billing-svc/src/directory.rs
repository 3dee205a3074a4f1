//! The client side of `directory.v1.DirectoryService.Authorize`: one shared channel (lazily
//! connected, reconnecting by itself), a deadline on every call (the smaller of the caller's
//! remaining deadline and the configured directory timeout), and retries with backoff only on
//! UNAVAILABLE, which is safe because Authorize reads nothing but writes nothing either.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use contract::directory::v1 as dpb;
use contract::directory::v1::directory_service_client::DirectoryServiceClient;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::domain::{Authorizer, CallContext, Caller, Check, Error, Result};

/// Time kept back from the caller's deadline so our answer reaches them before it expires.
const ANSWER_MARGIN: Duration = Duration::from_millis(20);
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_millis(400);

/// directory-svc over gRPC.
#[derive(Debug, Clone)]
pub struct GrpcDirectory {
    client: DirectoryServiceClient<Channel>,
    timeout: Duration,
}

impl GrpcDirectory {
    /// A client balancing over `urls` (one or more `http://host:port`). Nothing is connected
    /// until the first call, so billing starts while the directory is down.
    pub fn new(urls: &[String], timeout: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(!urls.is_empty(), "at least one directory URL is needed");
        let endpoints = urls
            .iter()
            .map(|url| {
                Endpoint::from_shared(url.clone())
                    .map(|e| {
                        e.connect_timeout(timeout)
                            .tcp_nodelay(true)
                            .http2_keep_alive_interval(Duration::from_secs(20))
                            .keep_alive_timeout(Duration::from_secs(5))
                            .keep_alive_while_idle(true)
                    })
                    .map_err(|e| anyhow::anyhow!("invalid directory URL {url:?}: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let channel = match endpoints.as_slice() {
            [one] => one.connect_lazy(),
            _ => Channel::balance_list(endpoints.into_iter()),
        };
        Ok(Self {
            client: DirectoryServiceClient::new(channel),
            timeout,
        })
    }

    fn deadline(&self, call: &CallContext) -> Instant {
        let ours = Instant::now() + self.timeout;
        match call.deadline {
            Some(theirs) => ours.min(theirs.checked_sub(ANSWER_MARGIN).unwrap_or(theirs)),
            None => ours,
        }
    }
}

fn action(check: Check) -> dpb::Action {
    match check {
        Check::Purchase => dpb::Action::PurchaseSubscription,
        Check::Manage => dpb::Action::ManageSubscriptions,
    }
}

#[async_trait]
impl Authorizer for GrpcDirectory {
    async fn authorize(&self, token: &str, call: &CallContext, check: Check) -> Result<Caller> {
        let deadline = self.deadline(call);
        let bearer = format!("Bearer {token}")
            .parse::<tonic::metadata::MetadataValue<_>>()
            .map_err(|_| Error::InvalidToken)?;
        let request_id = call
            .request_id
            .as_deref()
            .and_then(|id| id.parse::<tonic::metadata::MetadataValue<_>>().ok());
        let mut backoff = FIRST_BACKOFF;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::DirectoryUnavailable);
            }
            let mut request = tonic::Request::new(dpb::AuthorizeRequest {
                action: action(check) as i32,
            });
            request.set_timeout(remaining);
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
            if let Some(id) = &request_id {
                request.metadata_mut().insert("x-request-id", id.clone());
            }
            let mut client = self.client.clone();
            let status = match tokio::time::timeout(remaining, client.authorize(request)).await {
                Err(_elapsed) => {
                    tracing::warn!(
                        timeout_ms = remaining.as_millis() as u64,
                        "directory did not answer in time"
                    );
                    return Err(Error::DirectoryUnavailable);
                }
                Ok(Ok(answer)) => {
                    let answer = answer.into_inner();
                    return Ok(Caller {
                        user_id: answer.user_id,
                        directory_id: answer.directory_id,
                        allowed: answer.allowed,
                        reason: answer.reason,
                    });
                }
                Ok(Err(status)) => status,
            };
            match status.code() {
                Code::Unauthenticated => return Err(Error::InvalidToken),
                Code::Unavailable if Instant::now() + backoff < deadline => {
                    tracing::debug!(
                        backoff_ms = backoff.as_millis() as u64,
                        "directory unavailable; retrying"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Cancelled => {
                    tracing::warn!(code = ?status.code(), message = status.message(), "directory unavailable");
                    return Err(Error::DirectoryUnavailable);
                }
                code => {
                    return Err(Error::Internal(anyhow::anyhow!(
                        "directory answered Authorize with {code:?}: {}",
                        status.message()
                    )));
                }
            }
        }
    }
}
