//! The client side of `directory.v1.DirectoryService.Authorize`: tonic's generated client
//! over tonic's `Channel`s to each directory replica (one HTTP/2 connection per CPU, lazily
//! connected, reconnecting by itself; see [`platform::client`]), round-robin over the
//! replicas that are not marked down, a deadline on every call (the smaller of the caller's
//! remaining deadline and the configured directory timeout; running out of the caller's is
//! its DEADLINE_EXCEEDED), and retries of calls that got no answer (a status tonic made from
//! a transport error, or UNAVAILABLE), which is safe because Authorize changes nothing; with
//! another replica up, any failure that is not an answer about the token or the request goes
//! to it. A replica that fails is marked down for a moment, so calls go to the others at once
//! instead of waiting on it.

mod feed;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use contract::directory::v1 as dpb;
use contract::directory::v1::directory_service_client::DirectoryServiceClient;
use contract::refusal::Refusal;
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use platform::rpc::{REQUEST_ID_KEY, TRACEPARENT_KEY};

use crate::domain::{Authorizer, Caller, Check, Error, Result};

pub use feed::GrpcDirectoryFeed;

/// Time kept back from the caller's deadline so that our answer, when the directory fails,
/// reaches the caller before its deadline: a twentieth of what is left, at most 20 ms. A
/// fraction, never a floor: a caller that gives 3 ms to a 1 ms call gets its answer.
fn answer_margin(left: Duration) -> Duration {
    (left / 20).min(Duration::from_millis(20))
}

/// How long a call may wait for the directory, and whose limit that is.
#[derive(Debug, Clone, Copy)]
struct Budget {
    until: Instant,
    /// The caller's deadline is the tighter limit: running out of time is then the caller's
    /// DEADLINE_EXCEEDED, not the directory's failure.
    callers: bool,
}

impl Budget {
    /// The error for a call that ran out of this budget.
    fn spent(self) -> Error {
        if self.callers {
            Error::DeadlineExceeded
        } else {
            Error::DirectoryUnavailable
        }
    }
}
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_millis(400);
/// How long a replica that failed is passed over while others are up.
const MARK_DOWN: Duration = Duration::from_secs(2);

/// What the call being served carries besides its message, for the directory call it makes:
/// the caller's deadline, the request id and the trace. The transport sets it around the
/// domain's call ([`CallContext::scope`]); the domain never sees it.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    pub deadline: Option<Instant>,
    /// The `x-request-id` to send on, marked never-indexed.
    pub request_id: Option<MetadataValue<Ascii>>,
    /// The W3C `traceparent` to send on, naming this hop as the parent; never-indexed.
    pub traceparent: Option<MetadataValue<Ascii>>,
}

tokio::task_local! {
    static CALL: CallContext;
}

impl CallContext {
    /// Runs `work` with this context visible to the directory client.
    pub async fn scope<F: std::future::Future>(self, work: F) -> F::Output {
        CALL.scope(self, work).await
    }
}

/// One directory replica.
#[derive(Debug)]
struct Replica {
    url: String,
    /// One HTTP/2 connection per CPU: a single connection's frames are all handled by one
    /// task under one lock, which becomes the bottleneck when every billing call makes one
    /// (docs/decisions/directory-connections-per-cpu.md).
    clients: Box<[DirectoryServiceClient<Channel>]>,
    next_client: AtomicUsize,
    /// Until when (milliseconds since `GrpcDirectory::epoch`) this replica is passed over.
    down_until_ms: AtomicU64,
}

impl Replica {
    /// The next of this replica's connections in turn.
    fn client(&self) -> DirectoryServiceClient<Channel> {
        let i = self.next_client.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        self.clients[i].clone()
    }
}

/// directory-svc over gRPC.
#[derive(Debug, Clone)]
pub struct GrpcDirectory {
    replicas: Arc<[Replica]>,
    next: Arc<AtomicUsize>,
    epoch: Instant,
    timeout: Duration,
}

impl GrpcDirectory {
    /// A client balancing over `urls` (one or more `http://host:port`). Nothing is connected
    /// until the first call, so billing starts while the directory is down.
    pub fn new(
        urls: &[String],
        timeout: Duration,
        tls: Option<&platform::tls::ClientTls>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!urls.is_empty(), "at least one directory URL is needed");
        let replicas = urls
            .iter()
            .map(|url| {
                let endpoint = platform::client::endpoint(url, timeout, tls)
                    .map_err(|e| anyhow::anyhow!("--directory-url: {e:#}"))?;
                let connections =
                    std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
                Ok(Replica {
                    url: url.clone(),
                    clients: platform::client::lazy_channels(&endpoint, connections)
                        .into_iter()
                        .map(DirectoryServiceClient::new)
                        .collect(),
                    next_client: AtomicUsize::new(0),
                    down_until_ms: AtomicU64::new(0),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            replicas: replicas.into(),
            next: Arc::new(AtomicUsize::new(0)),
            epoch: Instant::now(),
            timeout,
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The next replica in turn that is not marked down; if all are, the next in turn.
    fn pick(&self) -> &Replica {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let count = self.replicas.len();
        (0..count)
            .map(|i| &self.replicas[(start + i) % count])
            .find(|r| r.down_until_ms.load(Ordering::Relaxed) <= now)
            .unwrap_or(&self.replicas[start % count])
    }

    fn mark_down(&self, replica: &Replica) {
        let until = self.now_ms().saturating_add(MARK_DOWN.as_millis() as u64);
        replica.down_until_ms.store(until, Ordering::Relaxed);
    }

    /// Whether another replica than `failed` is up to take a retry at once.
    fn another_is_up(&self, failed: &Replica) -> bool {
        let now = self.now_ms();
        self.replicas
            .iter()
            .any(|r| !std::ptr::eq(r, failed) && r.down_until_ms.load(Ordering::Relaxed) <= now)
    }

    /// The smaller of the caller's remaining deadline (less [`answer_margin`]) and the
    /// configured directory timeout.
    fn budget(&self, caller_deadline: Option<Instant>) -> Budget {
        let now = Instant::now();
        let ours = now + self.timeout;
        match caller_deadline {
            Some(theirs) => {
                let left = theirs.saturating_duration_since(now);
                let theirs = now + (left - answer_margin(left));
                Budget {
                    until: ours.min(theirs),
                    callers: theirs < ours,
                }
            }
            None => Budget {
                until: ours,
                callers: false,
            },
        }
    }
}

fn action(check: Check) -> dpb::Action {
    match check {
        Check::Purchase => dpb::Action::PurchaseSubscription,
        Check::Manage => dpb::Action::ManageSubscriptions,
        Check::Read => dpb::Action::ReadSubscriptions,
        Check::ManageLicenses => dpb::Action::ManageLicenses,
        Check::ReadLicenses => dpb::Action::ReadLicenses,
    }
}

#[async_trait]
impl Authorizer for GrpcDirectory {
    async fn authorize(&self, token: &str, check: Check, subject: Option<&str>) -> Result<Caller> {
        // What the call being served carries (see `CallContext`).
        let (caller_deadline, request_id, traceparent) = CALL
            .try_with(|call| {
                (
                    call.deadline,
                    call.request_id.clone(),
                    call.traceparent.clone(),
                )
            })
            .unwrap_or_default();
        let budget = self.budget(caller_deadline);
        let deadline = budget.until;
        let bearer = format!("Bearer {token}")
            .parse::<tonic::metadata::MetadataValue<_>>()
            .map_err(|_| Refusal::InvalidToken)?;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(budget.spent());
            }
            let mut request = tonic::Request::new(dpb::AuthorizeRequest {
                action: action(check) as i32,
                subject_user_id: subject.unwrap_or_default().to_owned(),
            });
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
            if let Some(id) = &request_id {
                request.metadata_mut().insert(REQUEST_ID_KEY, id.clone());
            }
            if let Some(trace) = &traceparent {
                request
                    .metadata_mut()
                    .insert(TRACEPARENT_KEY, trace.clone());
            }
            let replica = self.pick();
            // With another replica up, give this one half of the time left, so a replica that
            // hangs costs half the budget and the other still gets its turn.
            let failover = self.another_is_up(replica);
            let attempt = if failover { remaining / 2 } else { remaining };
            request.set_timeout(attempt);
            if let Some(timeout) = request.metadata_mut().get_mut("grpc-timeout") {
                timeout.set_sensitive(true);
            }
            let mut client = replica.client();
            let started = Instant::now();
            let outcome = tokio::time::timeout(attempt, client.authorize(request)).await;
            let code = match &outcome {
                Err(_) => "TIMEOUT",
                Ok(Ok(_)) => "OK",
                Ok(Err(status)) => platform::metrics::code_name(status.code()),
            };
            metrics::counter!("directory_client_requests_total", "code" => code).increment(1);
            metrics::histogram!("directory_client_request_seconds")
                .record(started.elapsed().as_secs_f64());
            let status = match outcome {
                Err(_elapsed) => {
                    tracing::warn!(
                        replica = %replica.url,
                        timeout_ms = attempt.as_millis() as u64,
                        "directory replica did not answer in time"
                    );
                    self.mark_down(replica);
                    if failover {
                        continue;
                    }
                    return Err(budget.spent());
                }
                Ok(Ok(answer)) => {
                    let answer = answer.into_inner();
                    return Ok(Caller {
                        user_id: answer.user_id,
                        directory_id: answer.directory_id,
                        allowed: answer.allowed,
                        reason: answer.reason,
                        subject_active: answer.subject_active,
                    });
                }
                Ok(Err(status)) => status,
            };
            // A status tonic made itself carries the transport's error as its source: the
            // call got no answer (refused, reset, the connection broke under it or was ended
            // by one of h2's guards), whatever code tonic gave it. Authorize changes nothing,
            // so such a call may always be made again.
            let unanswered = std::error::Error::source(&status).is_some();
            match status.code() {
                Code::Unauthenticated if !unanswered => return Err(Refusal::InvalidToken.into()),
                // No answer from this replica, or it is failing: another replica takes the
                // call.
                code if (unanswered
                    || matches!(
                        code,
                        Code::Unavailable
                            | Code::Unknown
                            | Code::Internal
                            | Code::DeadlineExceeded
                            | Code::Cancelled
                    ))
                    && self.another_is_up(replica) =>
                {
                    tracing::debug!(
                        replica = %replica.url,
                        code = ?status.code(),
                        message = status.message(),
                        "directory replica failed; trying another"
                    );
                    self.mark_down(replica);
                }
                // The directory gave up at the deadline we passed on: the caller's, or ours.
                Code::DeadlineExceeded | Code::Cancelled if !unanswered => {
                    tracing::debug!(replica = %replica.url, "directory call ran out of time");
                    return Err(budget.spent());
                }
                // Alone: down, or the connection broke mid-call (it reconnects by itself). Try
                // again after a pause while the budget allows; once it does not, the time ran
                // out (the caller's, or ours).
                code if unanswered || matches!(code, Code::Unavailable | Code::Unknown) => {
                    self.mark_down(replica);
                    if Instant::now() + backoff >= deadline {
                        tracing::debug!(
                            code = ?status.code(),
                            message = status.message(),
                            "directory unavailable until the deadline"
                        );
                        return Err(budget.spent());
                    }
                    tracing::debug!(
                        backoff_ms = backoff.as_millis() as u64,
                        code = ?status.code(),
                        "directory unavailable; retrying"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                // Answers that mean our request or the contract is wrong: a bug to log.
                code @ (Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::PermissionDenied
                | Code::NotFound
                | Code::AlreadyExists
                | Code::OutOfRange
                | Code::Unimplemented)
                    if !unanswered =>
                {
                    return Err(Error::Internal(anyhow::anyhow!(
                        "directory answered Authorize with {code:?}: {}",
                        status.message()
                    )));
                }
                // Everything else (down, overloaded, timed out, failing, a TLS or transport
                // error) means the directory cannot answer now.
                code => {
                    tracing::warn!(replica = %replica.url, ?code, message = status.message(), "directory unavailable");
                    return Err(Error::DirectoryUnavailable);
                }
            }
        }
    }
}
