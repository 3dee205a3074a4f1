//! Who may follow the directory's change feed, what they see, and when their stream must end.
//!
//! A Global Administrator follows their own directory's changes; a trusted service presenting
//! the service token follows every directory's. A user's stream ends when the token expires
//! (UNAUTHENTICATED), when the user is deleted (UNAUTHENTICATED) or loses the Global
//! Administrator role (PERMISSION_DENIED): the last two are changes of the feed itself, so a
//! stream ends exactly at the change that took the right away, and no later change reaches it.

use contract::refusal::Refusal;
use sha2::{Digest as _, Sha256};

use super::model::{ChangeKind, ChangeRecord};
use super::types::Role;
use super::{Denied, Error, Result, Service};

/// The feed's settings the rules need.
#[derive(Clone)]
pub struct Watching {
    /// SHA-256 of the service token, if the service has one. Compared by digest, so the
    /// comparison's time says nothing about the token.
    service_token: Option<[u8; 32]>,
    /// How long changes (and cursors) are kept, in microseconds.
    retention_micros: i64,
}

impl std::fmt::Debug for Watching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watching")
            .field("service_token", &self.service_token.is_some())
            .field("retention_micros", &self.retention_micros)
            .finish()
    }
}

impl Default for Watching {
    /// No service token; the contract's default retention (7 days).
    fn default() -> Self {
        Self::new(None, std::time::Duration::from_secs(7 * 24 * 3600))
    }
}

impl Watching {
    /// `service_token` is the token's text as the service read it (trimmed).
    pub fn new(service_token: Option<&str>, change_retention: std::time::Duration) -> Self {
        Self {
            service_token: service_token.map(digest),
            retention_micros: i64::try_from(change_retention.as_micros()).unwrap_or(i64::MAX),
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Who is watching.
#[derive(Debug, Clone)]
pub enum Watcher {
    /// A trusted service: every directory.
    Service,
    /// A signed-in user, as stored when the stream opened.
    User {
        user_id: String,
        directory_id: String,
        is_global_administrator: bool,
        /// When the token expires, in microseconds since the epoch.
        expiry: i64,
    },
}

impl Watcher {
    /// The directory whose changes the stream shows; `None`: all of them.
    pub fn directory(&self) -> Option<&str> {
        match self {
            Self::Service => None,
            Self::User { directory_id, .. } => Some(directory_id),
        }
    }
}

impl Service {
    /// The service with `watching`'s service token and change retention.
    pub fn with_watching(self, watching: Watching) -> Self {
        Self { watching, ..self }
    }

    /// Who the bearer token names: the service token, or a user's token as for every other
    /// call.
    pub async fn watcher(&self, bearer: Option<&str>) -> Result<Watcher> {
        if let (Some(token), Some(expected)) = (bearer, &self.watching.service_token)
            && digest(token) == *expected
        {
            return Ok(Watcher::Service);
        }
        let (user, expiry) = self.authenticate_until(bearer).await?;
        Ok(Watcher::User {
            is_global_administrator: user.roles.contains(Role::GlobalAdministrator),
            user_id: user.id,
            directory_id: user.directory_id,
            expiry,
        })
    }

    /// Whether `watcher` may open a stream: the service, or a Global Administrator.
    pub fn may_watch(&self, watcher: &Watcher) -> Result<()> {
        match watcher {
            Watcher::Service
            | Watcher::User {
                is_global_administrator: true,
                ..
            } => Ok(()),
            Watcher::User { .. } => Err(Error::PermissionDenied(Denied::NeedsGlobalAdministrator)),
        }
    }

    /// Whether a cursor of `time` (microseconds since the epoch) is still within the change
    /// retention.
    pub fn check_cursor_time(&self, time: i64) -> Result<()> {
        let oldest = self
            .clock
            .now_micros()
            .saturating_sub(self.watching.retention_micros);
        if time < oldest {
            return Err(Refusal::CursorExpired.into());
        }
        Ok(())
    }

    /// The time before which changes are removed.
    pub fn change_cutoff(&self) -> i64 {
        self.clock
            .now_micros()
            .saturating_sub(self.watching.retention_micros)
    }

    /// The time now, for a bookmark.
    pub fn now_micros(&self) -> i64 {
        self.clock.now_micros()
    }

    /// Whether `watcher`'s stream may deliver `change`; `Err` ends the stream with that error
    /// instead. Only changes committed after the watcher was authenticated (`fresh`) can take
    /// its right away: earlier ones are history it was authenticated after. A change that did
    /// not decode ends the stream too: skipping it would be a silent gap.
    pub fn admit(
        &self,
        watcher: &Watcher,
        change: &std::result::Result<ChangeRecord, String>,
        fresh: bool,
    ) -> Result<()> {
        let change = change
            .as_ref()
            .map_err(|why| Error::Internal(anyhow::anyhow!("undecodable change: {why}")))?;
        if !fresh {
            return Ok(());
        }
        let Watcher::User { user_id, .. } = watcher else {
            return Ok(());
        };
        let Some(user) = change.resource.user().filter(|u| u.id == *user_id) else {
            return Ok(());
        };
        match change.kind {
            ChangeKind::UserDeleted | ChangeKind::UserPurged => Err(Refusal::InvalidToken.into()),
            ChangeKind::UserRolesChanged if !user.roles.contains(Role::GlobalAdministrator) => {
                Err(Error::PermissionDenied(Denied::NeedsGlobalAdministrator))
            }
            _ => Ok(()),
        }
    }

    /// Whether `watcher`'s stream may stay open now (its token has not expired).
    pub fn still_valid(&self, watcher: &Watcher) -> Result<()> {
        match watcher {
            Watcher::User { expiry, .. } if self.clock.now_micros() >= *expiry => {
                Err(Refusal::InvalidToken.into())
            }
            _ => Ok(()),
        }
    }
}
