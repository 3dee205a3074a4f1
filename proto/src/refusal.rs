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
}
