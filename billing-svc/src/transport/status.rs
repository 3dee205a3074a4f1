//! The one mapping from [`Error`] to `tonic::Status`: code, ErrorInfo reason, BadRequest.

use platform::rpc::status;
use tonic::{Code, Status};

use crate::domain::Error;

/// `google.rpc.ErrorInfo.domain` of every error this service sends.
pub const ERROR_DOMAIN: &str = "billing-svc";

pub fn to_status(err: Error) -> Status {
    let message = err.to_string();
    let (code, reason, violations) = match &err {
        Error::Refused(refusal) => platform::rpc::refusal(refusal),
        Error::PermissionDenied(_) => (Code::PermissionDenied, "PERMISSION_DENIED", vec![]),
        Error::NotFound => (Code::NotFound, "SUBSCRIPTION_NOT_FOUND", vec![]),
        Error::UserNotFound => (Code::NotFound, "USER_NOT_FOUND", vec![]),
        Error::LicenseNotFound => (Code::NotFound, "LICENSE_NOT_FOUND", vec![]),
        Error::NoAvailableLicenses => (Code::FailedPrecondition, "NO_AVAILABLE_LICENSES", vec![]),
        Error::LicensesInUse => (Code::FailedPrecondition, "LICENSES_IN_USE", vec![]),
        Error::SubscriptionNotActive => {
            (Code::FailedPrecondition, "SUBSCRIPTION_NOT_ACTIVE", vec![])
        }
        Error::NotPerSeat => (
            Code::FailedPrecondition,
            "SUBSCRIPTION_NOT_PER_SEAT",
            vec![],
        ),
        Error::UpgradeNotAllowed => (Code::FailedPrecondition, "UPGRADE_NOT_ALLOWED", vec![]),
        Error::DirectoryOwned => (Code::FailedPrecondition, "DIRECTORY_OWNED", vec![]),
        Error::TransferNotAllowed => (Code::FailedPrecondition, "TRANSFER_NOT_ALLOWED", vec![]),
        Error::FreeTrialUsed => (Code::FailedPrecondition, "FREE_TRIAL_ALREADY_USED", vec![]),
        Error::RequestIdReused => (Code::FailedPrecondition, "REQUEST_ID_REUSED", vec![]),
        Error::DirectoryUnavailable => (Code::Unavailable, "DIRECTORY_UNAVAILABLE", vec![]),
        Error::DeadlineExceeded => (Code::DeadlineExceeded, "DEADLINE_EXCEEDED", vec![]),
        Error::Unavailable(source) => platform::rpc::database_unavailable(source),
        Error::Internal(source) => platform::rpc::internal(source),
    };
    status(ERROR_DOMAIN, code, reason, message, &violations)
}
