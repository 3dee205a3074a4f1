//! The directory's change feed, as billing's follower reads it (`domain::follow`): one
//! `WatchChanges` stream to one directory replica, authenticated with the service token read
//! from its file at each opening (so a token the directory creates after billing started is
//! found on the next try).

use std::path::PathBuf;

use async_trait::async_trait;
use contract::directory::v1 as dpb;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use tonic::Code;

use super::GrpcDirectory;
use crate::domain::follow::{DirectoryFeed, FeedEnd, FeedItem, UserChange, UserRef};

/// [`DirectoryFeed`] over the directory client's connections.
#[derive(Debug, Clone)]
pub struct GrpcDirectoryFeed {
    directory: GrpcDirectory,
    token_file: PathBuf,
}

impl GrpcDirectoryFeed {
    pub fn new(directory: GrpcDirectory, token_file: PathBuf) -> Self {
        Self {
            directory,
            token_file,
        }
    }
}

fn ended(status: &tonic::Status) -> FeedEnd {
    match status.code() {
        // The directory's only OUT_OF_RANGE on WatchChanges: CURSOR_EXPIRED.
        Code::OutOfRange => FeedEnd::Expired,
        // Answers about the token or the request: an operator must act (the wrong token
        // file, a directory of another deployment). Tried again all the same.
        code @ (Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument) => {
            FeedEnd::Refused(format!("{code:?}: {}", status.message()))
        }
        code => FeedEnd::Broken(format!("{code:?}: {}", status.message())),
    }
}

/// What a directory change means for licences.
fn item(change: dpb::Change) -> FeedItem {
    let kind = dpb::ChangeType::try_from(change.r#type).unwrap_or_default();
    let user = match change.resource {
        Some(dpb::change::Resource::User(user)) => Some(UserRef {
            user_id: user.id,
            directory_id: user.directory_id,
        }),
        _ => None,
    };
    let change_for = |user: UserRef| match kind {
        dpb::ChangeType::UserDeleted => Some(UserChange::Deleted(user)),
        dpb::ChangeType::UserRestored => Some(UserChange::Restored(user)),
        dpb::ChangeType::UserPurged => Some(UserChange::Purged(user)),
        _ => None,
    };
    FeedItem {
        cursor: change.cursor,
        change: user.and_then(change_for),
    }
}

#[async_trait]
impl DirectoryFeed for GrpcDirectoryFeed {
    async fn open(
        &self,
        cursor: &str,
    ) -> Result<BoxStream<'static, Result<FeedItem, FeedEnd>>, FeedEnd> {
        let token = match storage::service_token::load(&self.token_file) {
            Ok(Some(token)) => token,
            Ok(None) => return Err(FeedEnd::NoToken),
            Err(err) => return Err(FeedEnd::Broken(format!("{err:#}"))),
        };
        let bearer = format!("Bearer {token}")
            .parse::<tonic::metadata::MetadataValue<_>>()
            .map_err(|_| FeedEnd::Broken("the service token is not a header value".into()))?;
        let mut request = tonic::Request::new(dpb::WatchChangesRequest {
            start_after: cursor.to_owned(),
            start_at_now: false,
        });
        let mut bearer = bearer;
        bearer.set_sensitive(true);
        request.metadata_mut().insert("authorization", bearer);
        let replica = self.directory.pick();
        let stream = replica
            .client()
            .watch_changes(request)
            .await
            .map_err(|status| {
                if std::error::Error::source(&status).is_some()
                    || status.code() == Code::Unavailable
                {
                    self.directory.mark_down(replica);
                }
                ended(&status)
            })?
            .into_inner();
        Ok(stream
            .map(|next| next.map(item).map_err(|status| ended(&status)))
            .boxed())
    }
}
