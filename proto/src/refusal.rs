//! The refusals any call of either service can get before a rule of the service applies: a
//! bad field, a bad page token, no bearer token, a bad one. Both services' error types carry
//! them as one variant, and `platform::rpc::refusal` maps them to statuses once.

use crate::fields::{Violation, violations_message};
use crate::paging::PageTokenError;

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Every bad field of the request (INVALID_ARGUMENT with BadRequest).
    #[error("{}", violations_message(.0))]
    InvalidArgument(Vec<Violation>),
    /// A page token that is malformed, forged, or from another list, scope or filter.
    #[error("{0}")]
    InvalidPageToken(PageTokenError),
    /// No bearer token in the request.
    #[error(
        "missing bearer token: send metadata 'authorization: Bearer <access_token>' from SignIn"
    )]
    MissingToken,
    /// A token that is malformed, badly signed, expired, or whose user no longer exists.
    #[error("access token is invalid or expired")]
    InvalidToken,
    /// WatchChanges: a `start_after` that is malformed, tampered with or minted by another
    /// service, or given together with `start_at_now`.
    #[error("{0}")]
    InvalidCursor(&'static str),
    /// WatchChanges: the cursor is older than the change retention, or the changes after it
    /// were removed.
    #[error("the cursor is older than the change retention; start again without start_after")]
    CursorExpired,
    /// A change stream whose reader stopped reading for longer than the limit.
    #[error("the stream's reader stopped reading; resume after the last cursor received")]
    ConsumerTooSlow,
    /// More change streams than the server keeps open.
    #[error("too many change streams are open on this server; retry later")]
    TooManyStreams,
    /// The server is stopping: streams end at once.
    #[error("the server is stopping; resume after the last cursor received")]
    ShuttingDown,
}
