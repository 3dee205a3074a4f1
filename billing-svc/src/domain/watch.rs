//! Who may follow billing's change feed, and when their stream must end.
//!
//! A Global or Billing Administrator (the directory's `Authorize` for managing
//! subscriptions) follows their own directory's changes. The directory is asked again every
//! few seconds while the stream is open: a token that stopped working (expired, its user
//! deleted) ends the stream with UNAUTHENTICATED, a role taken away with PERMISSION_DENIED.
//! A directory that does not answer ends nothing: the stream keeps what it was granted until
//! the directory says otherwise.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use contract::refusal::Refusal;

use super::model::ChangeRecord;
use super::{Check, Error, Result, Service};

/// A watcher of the feed, for as long as its stream is open.
#[derive(Debug)]
pub struct Watcher {
    pub directory_id: String,
    /// Set by the re-check when the directory no longer grants the stream.
    revoked: Arc<Mutex<Option<Error>>>,
    recheck: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.recheck.abort();
    }
}

impl Watcher {
    /// Whether the stream may stay open: `Err` once the directory revoked it.
    pub fn still_valid(&self) -> Result<()> {
        match self.revoked.lock().ok().and_then(|mut slot| slot.take()) {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

/// What the directory answered when asked again.
fn verdict(answer: Result<super::Caller>) -> Option<Error> {
    match answer {
        Ok(caller) if caller.allowed => None,
        Ok(caller) => Some(Error::PermissionDenied(caller.reason)),
        Err(err @ Error::Refused(_)) => Some(err),
        // Unavailable, slow, failing: not an answer about the caller.
        Err(_) => None,
    }
}

impl Service {
    /// Opens the watch of `caller` (authenticated by `token`): PERMISSION_DENIED unless a
    /// Global or Billing Administrator; asked again every `recheck` while it lasts.
    pub fn watcher(
        self: &Arc<Self>,
        caller: super::Caller,
        token: &str,
        recheck: Duration,
    ) -> Result<Watcher> {
        if !caller.allowed {
            return Err(Error::PermissionDenied(caller.reason));
        }
        let revoked = Arc::new(Mutex::new(None));
        let slot = revoked.clone();
        let service = Arc::downgrade(self);
        let token = token.to_owned();
        let recheck = tokio::spawn(async move {
            let mut tick = tokio::time::interval(recheck);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(service) = service.upgrade() else {
                    return;
                };
                let answer = service
                    .directory
                    .authorize(&token, Check::Manage, None)
                    .await;
                if let Some(err) = verdict(answer) {
                    if let Ok(mut slot) = slot.lock() {
                        *slot = Some(err);
                    }
                    return;
                }
            }
        });
        Ok(Watcher {
            directory_id: caller.directory_id,
            revoked,
            recheck,
        })
    }

    /// Whether a change may be delivered: one that did not decode ends the stream, since
    /// skipping it would be a silent gap.
    pub fn admit(&self, change: &std::result::Result<ChangeRecord, String>) -> Result<()> {
        change
            .as_ref()
            .map(|_| ())
            .map_err(|why| Error::Internal(anyhow::anyhow!("undecodable change: {why}")))
    }

    /// Whether a cursor of `time` (microseconds since the epoch) is still within the change
    /// retention.
    pub fn check_cursor_time(&self, time: i64, retention: Duration) -> Result<()> {
        if time < self.change_cutoff(retention) {
            return Err(Refusal::CursorExpired.into());
        }
        Ok(())
    }

    /// The time before which changes are removed.
    pub fn change_cutoff(&self, retention: Duration) -> i64 {
        self.clock
            .now_micros()
            .saturating_sub(i64::try_from(retention.as_micros()).unwrap_or(i64::MAX))
    }

    /// The time now, for a bookmark.
    pub fn now_micros(&self) -> i64 {
        self.clock.now_micros()
    }
}
