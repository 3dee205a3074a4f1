//! The one error type of directory-svc. The transport maps each variant to a gRPC status in
//! one exhaustive match; `Internal` is logged there and answered with a generic message.

use contract::refusal::Refusal;

/// A resource whose absence (or invisibility) is reported as NOT_FOUND.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Directory,
    User,
}

/// Why a signed-in caller may not do what they asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Managing users needs Global or User Administrator.
    NeedsUserManager,
    /// Granting roles at user creation needs Global Administrator.
    NeedsGlobalAdministratorToGrant,
    /// Changing roles needs Global Administrator.
    NeedsGlobalAdministrator,
    /// A User Administrator cannot delete, restore or purge a user holding any role.
    TargetHoldsRoles,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad field, page token or bearer token (the same in both services).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Unknown UPN or wrong password: indistinguishable on purpose.
    #[error("incorrect user principal name or password")]
    BadCredentials,
    #[error("{}", denied_message(*.0))]
    PermissionDenied(Denied),
    #[error("{} not found", match .0 { Resource::Directory => "directory", Resource::User => "user" })]
    NotFound(Resource),
    #[error("domain prefix '{0}' is already taken")]
    DomainTaken(String),
    #[error("user principal name '{0}' is already taken")]
    UpnTaken(String),
    /// A restore without a new UPN, when another user took the old one meanwhile.
    #[error(
        "user principal name '{0}' was taken while the user was deleted; restore it under a new_user_principal_name"
    )]
    OldUpnTaken(String),
    #[error("the directory must keep at least one Global Administrator")]
    LastGlobalAdministrator,
    #[error("a Global Administrator cannot remove that role from themself")]
    SelfDemotion,
    /// Too many attempts from this peer or on this UPN; retry after the duration.
    #[error("too many attempts; retry in {} s", .0.as_secs().max(1))]
    Throttled(std::time::Duration),
    /// Too many password checks at once; the caller may retry later.
    #[error("the directory is busy checking passwords; retry later")]
    Overloaded,
    /// The database cannot be reached right now; the caller may retry.
    #[error("the directory's database is unavailable; retry later")]
    Unavailable(#[source] anyhow::Error),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

fn denied_message(denied: Denied) -> &'static str {
    match denied {
        Denied::NeedsUserManager => "requires the Global Administrator or User Administrator role",
        Denied::NeedsGlobalAdministratorToGrant => {
            "granting roles requires the Global Administrator role"
        }
        Denied::NeedsGlobalAdministrator => "requires the Global Administrator role",
        Denied::TargetHoldsRoles => {
            "a User Administrator cannot delete, restore or purge a user who holds a role"
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
