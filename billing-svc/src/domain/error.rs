//! The one error type of billing-svc. The transport maps each variant to a gRPC status in one
//! exhaustive match; internal variants are logged there and answered with a generic message.

use contract::refusal::Refusal;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad field, page token or bearer token (the same in both services).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The directory decided the caller may not do this; carries its reason.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("subscription not found")]
    NotFound,
    /// Not an active user of the caller's directory (deleted, of another directory, unknown).
    #[error("user not found")]
    UserNotFound,
    #[error("the user holds no licence of this offer")]
    LicenseNotFound,
    #[error("every licence of this offer in the directory is assigned; buy seats or free one")]
    NoAvailableLicenses,
    #[error(
        "the directory's pool of this offer would have fewer seats than assigned licences; remove licences first"
    )]
    LicensesInUse,
    #[error("the subscription is not active")]
    SubscriptionNotActive,
    #[error("the subscription is not sold per seat")]
    NotPerSeat,
    #[error("only an active or expired azure-free-trial can be upgraded, to azure-pay-as-you-go")]
    UpgradeNotAllowed,
    #[error("an Office 365 subscription belongs to its directory and has no owner to change")]
    DirectoryOwned,
    #[error("only an active azure-pay-as-you-go subscription can be transferred")]
    TransferNotAllowed,
    #[error("the free trial has already been used by this user")]
    FreeTrialUsed,
    #[error("request_id was already used with different fields")]
    RequestIdReused,
    /// The directory service could not be reached, failed, or did not answer within billing's
    /// own directory timeout, all within a time the caller allowed.
    #[error("the directory service is unavailable; retry later")]
    DirectoryUnavailable,
    /// The caller's deadline ran out before the directory answered.
    #[error("the caller's deadline passed before the directory answered")]
    DeadlineExceeded,
    /// Our own database cannot be reached right now.
    #[error("the billing database is unavailable; retry later")]
    Unavailable(#[source] anyhow::Error),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
