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
}

impl User {
    /// The lower-cased UPN: the unique key and the list order.
    pub fn upn_key(&self) -> String {
        self.upn.to_ascii_lowercase()
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
}
