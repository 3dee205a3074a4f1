//! What the directory stores and answers with.

use super::types::RoleSet;

/// A directory (tenant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directory {
    pub id: String,
    pub display_name: String,
    /// Lower-case `<prefix>` of `<prefix>.onmicrosoft.com`.
    pub domain_prefix: String,
    pub initial_domain: String,
    /// Microseconds since the Unix epoch.
    pub create_time: i64,
}

/// A user of one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub directory_id: String,
    pub upn: String,
    pub display_name: String,
    pub roles: RoleSet,
    /// Microseconds since the Unix epoch.
    pub create_time: i64,
    /// Moved on by every restore: a token names the generation it was issued for, and only
    /// the current one is accepted, so no token issued before a deletion works after it.
    pub token_generation: u32,
}

impl User {
    /// The lower-cased UPN: the unique key and the list order.
    pub fn upn_key(&self) -> String {
        self.upn.to_ascii_lowercase()
    }
}

/// A user in its directory's deleted users, restorable until `purge_time`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedUser {
    pub user: User,
    /// Microseconds since the Unix epoch.
    pub delete_time: i64,
    /// `delete_time` plus the retention: from then on the user is gone for good.
    pub purge_time: i64,
}

/// One page of deleted users.
#[derive(Debug)]
pub struct DeletedUserPage {
    pub users: Vec<DeletedUser>,
    /// Empty on the last page.
    pub next_page_token: String,
}

/// What a change recorded in the change feed's outbox is (the values of
/// `directory.v1.ChangeType`). The store records one in the transaction of each write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    DirectoryCreated = 2,
    UserCreated = 3,
    UserRolesChanged = 4,
    UserDeleted = 5,
    UserRestored = 6,
    UserPurged = 7,
}

impl ChangeKind {
    pub fn from_value(value: i64) -> Option<Self> {
        Some(match value {
            2 => Self::DirectoryCreated,
            3 => Self::UserCreated,
            4 => Self::UserRolesChanged,
            5 => Self::UserDeleted,
            6 => Self::UserRestored,
            7 => Self::UserPurged,
            _ => return None,
        })
    }
}

/// A committed change as the feed reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    pub kind: ChangeKind,
    pub resource: ChangeResource,
}

/// The resource a change shows: as it is after the change, or as it last was (a purge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeResource {
    Directory(Directory),
    User(User),
    /// A user with its `delete_time` and `purge_time` (deleted, or purged from the bin).
    DeletedUser(DeletedUser),
}

impl ChangeResource {
    /// The user the change is about, if any.
    pub fn user(&self) -> Option<&User> {
        match self {
            Self::Directory(_) => None,
            Self::User(user) | Self::DeletedUser(DeletedUser { user, .. }) => Some(user),
        }
    }
}

/// A successful sign-in.
#[derive(Debug)]
pub struct SignedIn {
    pub access_token: String,
    /// Microseconds since the Unix epoch.
    pub expire_time: i64,
    pub user: User,
}

/// One page of users.
#[derive(Debug)]
pub struct UserPage {
    pub users: Vec<User>,
    /// Empty on the last page.
    pub next_page_token: String,
}

/// The answer to Authorize.
#[derive(Debug)]
pub struct Decision {
    pub allowed: bool,
    pub user: User,
    pub reason: String,
    /// Whether the user asked about is an active user of the caller's directory (false when
    /// none was asked about).
    pub subject_active: bool,
}
