//! The one mapping from [`Error`] to `tonic::Status`: code, ErrorInfo reason, BadRequest.

use platform::rpc::status;
use tonic::{Code, Status};

use crate::domain::{Denied, Error, Resource};

/// `google.rpc.ErrorInfo.domain` of every error this service sends.
pub const ERROR_DOMAIN: &str = "directory-svc";

pub fn to_status(err: Error) -> Status {
    let message = err.to_string();
    let (code, reason, violations) = match &err {
        Error::Refused(refusal) => platform::rpc::refusal(refusal),
        Error::BadCredentials => (Code::Unauthenticated, "INVALID_CREDENTIALS", vec![]),
        Error::PermissionDenied(denied) => {
            let reason = match denied {
                Denied::NeedsUserManager => "USER_ADMINISTRATOR_REQUIRED",
                Denied::NeedsGlobalAdministratorToGrant | Denied::NeedsGlobalAdministrator => {
                    "GLOBAL_ADMINISTRATOR_REQUIRED"
                }
                Denied::TargetHoldsRoles => "TARGET_HOLDS_ROLES",
            };
            (Code::PermissionDenied, reason, vec![])
        }
        Error::NotFound(Resource::Directory) => (Code::NotFound, "DIRECTORY_NOT_FOUND", vec![]),
        Error::NotFound(Resource::User) => (Code::NotFound, "USER_NOT_FOUND", vec![]),
        Error::DomainTaken(_) => (Code::AlreadyExists, "DOMAIN_PREFIX_TAKEN", vec![]),
        Error::UpnTaken(_) => (Code::AlreadyExists, "USER_PRINCIPAL_NAME_TAKEN", vec![]),
        Error::OldUpnTaken(_) => (Code::AlreadyExists, "UPN_TAKEN", vec![]),
        Error::LastGlobalAdministrator => (
            Code::FailedPrecondition,
            "LAST_GLOBAL_ADMINISTRATOR",
            vec![],
        ),
        Error::SelfDemotion => (Code::FailedPrecondition, "SELF_DEMOTION", vec![]),
        Error::Overloaded => (Code::ResourceExhausted, "OVERLOADED", vec![]),
        Error::Throttled(retry) => {
            return platform::rpc::throttled(ERROR_DOMAIN, "RATE_LIMITED", message, *retry);
        }
        Error::Unavailable(source) => platform::rpc::database_unavailable(source),
        Error::Internal(source) => platform::rpc::internal(source),
    };
    status(ERROR_DOMAIN, code, reason, message, &violations)
}
