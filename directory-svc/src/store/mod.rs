//! Persistence of directories and users behind one trait. [`SqlStore`] implements it for
//! SQLite and PostgreSQL with the same SQL. The invariants that must hold under concurrency
//! (unique prefix and UPN, at least one Global Administrator, "only users without roles") are
//! enforced here, inside one transaction or by a unique index, never by check-then-write.

mod sql;

pub use sql::SqlStore;

use async_trait::async_trait;

use crate::domain::model::{Directory, User};
use crate::domain::types::RoleSet;

/// Outcomes a store call reports besides success.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("domain prefix already taken")]
    DomainTaken,
    #[error("user principal name already taken")]
    UpnTaken,
    #[error("no such user in the directory")]
    UserNotFound,
    #[error("the user holds roles")]
    HasRoles,
    #[error("no Global Administrator would remain")]
    LastGlobalAdministrator,
    #[error(transparent)]
    Backend(#[from] sqlx::Error),
}

#[async_trait]
pub trait DirectoryStore: Send + Sync + 'static {
    /// Creates the directory and its first user together.
    async fn create_directory(
        &self,
        directory: &Directory,
        admin: &User,
        password_hash: &str,
    ) -> Result<(), StoreError>;

    async fn directory(&self, id: &str) -> Result<Option<Directory>, StoreError>;

    async fn user(&self, id: &str) -> Result<Option<User>, StoreError>;

    /// The user with this lower-cased UPN.
    async fn user_by_upn(&self, upn_key: &str) -> Result<Option<User>, StoreError>;

    /// The user with this lower-cased UPN and their password hash.
    async fn credentials(&self, upn_key: &str) -> Result<Option<(User, String)>, StoreError>;

    async fn insert_user(&self, user: &User, password_hash: &str) -> Result<(), StoreError>;

    /// Up to `limit` users of the directory ordered by lower-cased UPN, after `after_key`
    /// (empty: from the start), holding a role of `role_mask` (0: any user).
    async fn list_users(
        &self,
        directory_id: &str,
        role_mask: i64,
        after_key: &str,
        limit: u32,
    ) -> Result<Vec<User>, StoreError>;

    /// Replaces the user's roles, unless no Global Administrator would remain.
    async fn set_roles(
        &self,
        directory_id: &str,
        user_id: &str,
        roles: RoleSet,
    ) -> Result<User, StoreError>;

    /// Deletes the user, unless no Global Administrator would remain, or `only_without_roles`
    /// and the user holds a role.
    async fn delete_user(
        &self,
        directory_id: &str,
        user_id: &str,
        only_without_roles: bool,
    ) -> Result<(), StoreError>;
}
