//! Billing follows the directory's change feed to keep licences with their users: a deleted
//! user's licences are set aside (their seats freed), a restored user gets back those whose
//! pool still has a free seat, a purged user's are dropped.
//!
//! Exactly once: the directory's cursor is stored in billing's database and moved, compared
//! with the cursor it moves from, in the transaction of the change's effects. A restart, a
//! directory outage or a follower that dies mid-change replays from the stored cursor, and a
//! change whose effects committed moved the cursor past itself, so it is never applied again;
//! two followers racing (one whose lease ran out while it worked) cannot both move it.
//!
//! One follower at a time: the replica holding the lease follows (renewing it every second);
//! another takes over within the lease's few seconds when it dies, or at once when it stops.
//! Changes that concern no licence (a user created, roles changed) move the stored cursor at
//! most once a second, with no effect to apply.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use platform::clock::Clock;
use tokio::sync::watch;

use super::ports::StoreError;

/// A user as a directory change names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRef {
    pub user_id: String,
    pub directory_id: String,
}

/// What a directory change means for licences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserChange {
    /// Set the user's licences aside, freeing their seats; refuse new ones.
    Deleted(UserRef),
    /// Give back those set aside whose pools have a free seat; drop the others.
    Restored(UserRef),
    /// Drop those set aside.
    Purged(UserRef),
}

/// One item of the directory's feed: a change (with what it means for licences, if anything)
/// or a bookmark, each at its cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedItem {
    pub cursor: String,
    pub change: Option<UserChange>,
}

/// Why the directory's feed could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEnd {
    /// The service token's file does not exist (yet): the directory creates it.
    NoToken,
    /// The stored cursor is older than the directory keeps changes.
    Expired,
    /// The directory refused the token or the request: worth telling an operator.
    Refused(String),
    /// Unreachable, failing, ended: worth trying again.
    Broken(String),
}

/// The directory's change feed, read with the service token (implemented over gRPC in
/// `crate::directory`).
#[async_trait]
pub trait DirectoryFeed: Send + Sync + 'static {
    /// The changes after `cursor` (`""`: from the oldest kept), then new ones as they come.
    async fn open(
        &self,
        cursor: &str,
    ) -> Result<BoxStream<'static, Result<FeedItem, FeedEnd>>, FeedEnd>;
}

/// Where the follower keeps its place and applies its effects.
#[async_trait]
pub trait FollowerStore: Send + Sync + 'static {
    /// Takes or renews the follower's lease for `ttl`: whether this process holds it.
    async fn hold(&self, ttl: Duration) -> Result<bool, StoreError>;
    /// Gives the lease up, so another replica takes over at once.
    async fn release(&self) -> Result<(), StoreError>;
    /// The cursor of the last change applied (`""`: none yet).
    async fn position(&self) -> Result<String, StoreError>;
    /// Applies `change` (if any) and moves the cursor from `from` to `to`, in one
    /// transaction: `false` (and nothing done) when the cursor stored is not `from`.
    async fn advance(
        &self,
        from: &str,
        to: &str,
        change: Option<&UserChange>,
        now: i64,
    ) -> Result<bool, StoreError>;
}

/// How the follower paces itself.
#[derive(Debug, Clone, Copy)]
pub struct FollowSettings {
    /// How long a lease lasts without renewal: how soon another replica takes over.
    pub lease: Duration,
    /// How often the lease is renewed.
    pub renew: Duration,
    /// How long to wait before trying again (no token, directory down, lease held elsewhere).
    pub retry: Duration,
    /// How often the cursor of changes without effects is stored.
    pub save: Duration,
}

impl Default for FollowSettings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(5),
            renew: Duration::from_secs(1),
            retry: Duration::from_secs(1),
            save: Duration::from_secs(1),
        }
    }
}

/// Why one turn of following ended.
#[derive(Debug)]
enum Turn {
    Stopped,
    /// Another replica holds the lease, or took it over.
    NotHolder,
    /// The stored cursor moved under us (another follower): start again from it.
    Moved,
    Feed(FeedEnd),
    Store(StoreError),
}

pub struct Follower {
    store: Arc<dyn FollowerStore>,
    feed: Arc<dyn DirectoryFeed>,
    clock: Arc<dyn Clock>,
    settings: FollowSettings,
}

impl Follower {
    pub fn new(
        store: Arc<dyn FollowerStore>,
        feed: Arc<dyn DirectoryFeed>,
        clock: Arc<dyn Clock>,
        settings: FollowSettings,
    ) -> Self {
        Self {
            store,
            feed,
            clock,
            settings,
        }
    }

    /// Follows until `stop` turns true, then gives the lease up.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut said_no_token = false;
        let mut said_refused: Option<String> = None;
        loop {
            let turn = self.turn(&mut stop).await.unwrap_or_else(Turn::Store);
            metrics::gauge!("billing_directory_follower_holding").set(0.0);
            let waiting_for_token = matches!(turn, Turn::Feed(FeedEnd::NoToken));
            match turn {
                Turn::Stopped => break,
                Turn::NotHolder | Turn::Moved => {}
                Turn::Feed(FeedEnd::NoToken) => {
                    if !said_no_token {
                        tracing::info!(
                            "no directory service token yet; following the directory's changes once it exists"
                        );
                        said_no_token = true;
                    }
                }
                Turn::Feed(FeedEnd::Expired) => {
                    tracing::error!(
                        "the directory no longer keeps the changes after billing's cursor: \
                         following from the oldest it keeps; users deleted or restored in \
                         between keep their licences as they were"
                    );
                    metrics::counter!("billing_directory_follower_expired_total").increment(1);
                    if let Err(err) = self.restart_from_oldest().await {
                        tracing::warn!(error = %err, "cannot reset the directory cursor");
                    }
                    continue;
                }
                Turn::Feed(FeedEnd::Refused(why)) => {
                    if said_refused.as_deref() != Some(why.as_str()) {
                        tracing::warn!(%why, "the directory refuses billing's service token or request; retrying every second (check --directory-service-token-file)");
                        said_refused = Some(why);
                    }
                }
                Turn::Feed(FeedEnd::Broken(why)) => {
                    tracing::debug!(%why, "directory feed unavailable; retrying");
                }
                Turn::Store(err) => {
                    tracing::warn!(error = %err, "billing database unavailable to the directory follower; retrying");
                }
            }
            if !waiting_for_token {
                said_no_token = false;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.retry) => {}
                _ = stop.changed() => break,
            }
        }
        if let Err(err) = self.store.release().await {
            tracing::debug!(error = %err, "cannot release the follower's lease; it runs out");
        }
    }

    async fn restart_from_oldest(&self) -> Result<(), StoreError> {
        let from = self.store.position().await?;
        self.store.advance(&from, "", None, 0).await.map(|_| ())
    }

    /// One turn: take the lease, open the feed at the stored cursor, apply what comes.
    async fn turn(&self, stop: &mut watch::Receiver<bool>) -> Result<Turn, StoreError> {
        if *stop.borrow() {
            return Ok(Turn::Stopped);
        }
        if !self.store.hold(self.settings.lease).await? {
            return Ok(Turn::NotHolder);
        }
        metrics::gauge!("billing_directory_follower_holding").set(1.0);
        let mut stored = self.store.position().await?;
        let mut feed = match self.feed.open(&stored).await {
            Ok(feed) => feed,
            Err(end) => return Ok(Turn::Feed(end)),
        };
        tracing::info!("following the directory's changes");
        // The cursor of changes read past `stored` that had nothing to apply.
        let mut unsaved: Option<String> = None;
        let mut renew = tokio::time::interval(self.settings.renew);
        let mut save = tokio::time::interval(self.settings.save);
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    if let Some(to) = unsaved.take() {
                        let _ = self.store.advance(&stored, &to, None, 0).await;
                    }
                    return Ok(Turn::Stopped);
                }
                _ = renew.tick() => {
                    if !self.store.hold(self.settings.lease).await? {
                        return Ok(Turn::NotHolder);
                    }
                }
                _ = save.tick() => {
                    if let Some(to) = unsaved.take() {
                        if !self.store.advance(&stored, &to, None, 0).await? {
                            return Ok(Turn::Moved);
                        }
                        stored = to;
                    }
                }
                item = feed.next() => match item {
                    None => return Ok(Turn::Feed(FeedEnd::Broken("the stream ended".into()))),
                    Some(Err(end)) => return Ok(Turn::Feed(end)),
                    Some(Ok(FeedItem { cursor, change: None })) => unsaved = Some(cursor),
                    Some(Ok(FeedItem { cursor, change: Some(change) })) => {
                        let now = self.clock.now_micros();
                        if !self.store.advance(&stored, &cursor, Some(&change), now).await? {
                            return Ok(Turn::Moved);
                        }
                        metrics::counter!("billing_directory_follower_applied_total", "change" => match change {
                            UserChange::Deleted(_) => "deleted",
                            UserChange::Restored(_) => "restored",
                            UserChange::Purged(_) => "purged",
                        })
                        .increment(1);
                        stored = cursor;
                        unsaved = None;
                    }
                },
            }
        }
    }
}
