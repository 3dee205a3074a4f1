//! The domain's ports: what it needs from persistence, as a trait the store implements.
//! The store classifies its database's failures into [`StoreError`]; the domain never sees a
//! database type. Every write records its change (`model::ChangeKind`) in the change feed's
//! outbox in its own transaction; a write that changes nothing records nothing.

use async_trait::async_trait;

use super::model::{DeletedUser, Directory, User};
use super::types::RoleSet;

/// Who is writing, and the roles the domain's permission decision was based on. Every write
/// made for a user re-reads that user inside its transaction, after locking the directory: if
/// their roles changed (or they were deleted) since authentication, the write is refused with
/// [`StoreError::ActorChanged`] and the domain decides again.
#[derive(Debug, Clone)]
pub struct Actor {
    pub id: String,
    pub roles: RoleSet,
}

impl Actor {
    pub fn of(user: &User) -> Self {
        Self {
            id: user.id.clone(),
            roles: user.roles,
        }
    }
}

/// Outcomes a store call reports besides success.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("domain prefix already taken")]
    DomainTaken,
    #[error("user principal name already taken")]
    UpnTaken,
    /// A restore without a new UPN: the user's old UPN was taken while it was deleted.
    #[error("the user's old user principal name is taken")]
    OldUpnTaken(String),
    #[error("no such user in the directory")]
    UserNotFound,
    #[error("the user holds roles")]
    HasRoles,
    #[error("no Global Administrator would remain")]
    LastGlobalAdministrator,
    /// The acting user's roles are not those the decision was based on (`Some`: as stored
    /// now), or the acting user no longer exists (`None`).
    #[error("the acting user changed")]
    ActorChanged(Option<RoleSet>),
    /// The database cannot be reached right now (retryable).
    #[error("database unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// The database failed in a way a retry will not mend.
    #[error("database failure")]
    Internal(#[source] anyhow::Error),
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

    /// Creates a user on behalf of `actor`.
    async fn insert_user(
        &self,
        user: &User,
        password_hash: &str,
        actor: &Actor,
    ) -> Result<(), StoreError>;

    /// Up to `limit` users of the directory ordered by lower-cased UPN, after `after_key`
    /// (empty: from the start), holding a role of `role_mask` (0: any user).
    async fn list_users(
        &self,
        directory_id: &str,
        role_mask: i64,
        after_key: &str,
        limit: u32,
    ) -> Result<Vec<User>, StoreError>;

    /// Replaces the user's roles on behalf of `actor` at `now`, unless no Global Administrator
    /// would remain.
    async fn set_roles(
        &self,
        directory_id: &str,
        user_id: &str,
        roles: RoleSet,
        actor: &Actor,
        now: i64,
    ) -> Result<User, StoreError>;

    /// Moves the user to the directory's deleted users on behalf of `actor`, unless no Global
    /// Administrator would remain, or `only_without_roles` and the user holds a role. Its UPN
    /// is free once this returns.
    async fn delete_user(
        &self,
        target: Target<'_>,
        actor: &Actor,
        delete_time: i64,
        purge_time: i64,
    ) -> Result<(), StoreError>;

    /// Up to `limit` of the directory's deleted users whose `purge_time` is after `now`,
    /// ordered by lower-cased UPN then id, after `after` (a UPN key and an id; `None`: from
    /// the start).
    async fn list_deleted_users(
        &self,
        directory_id: &str,
        now: i64,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<DeletedUser>, StoreError>;

    /// Brings a deleted user whose `purge_time` is after `now` back on behalf of `actor`,
    /// under `new_upn` if given (`UpnTaken` if it is taken) or its old UPN
    /// (`OldUpnTaken`), with its token generation moved on. `UserNotFound` when the user is
    /// not among the directory's deleted users; `HasRoles` when `only_without_roles` and it
    /// holds a role.
    async fn restore_user(
        &self,
        target: Target<'_>,
        new_upn: Option<&str>,
        actor: &Actor,
        now: i64,
    ) -> Result<User, StoreError>;

    /// Deletes a deleted user whose `purge_time` is after `now` for good, on behalf of
    /// `actor`; the same refusals as [`DirectoryStore::restore_user`].
    async fn purge_user(
        &self,
        target: Target<'_>,
        actor: &Actor,
        now: i64,
    ) -> Result<(), StoreError>;

    /// Deletes for good up to `limit` deleted users (of any directory) whose `purge_time` is
    /// at or before `now`; how many went.
    async fn purge_expired(&self, now: i64, limit: u32) -> Result<u64, StoreError>;
}

/// The user a write is about, in the acting user's directory.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub directory_id: &'a str,
    pub user_id: &'a str,
    /// Refuse (`HasRoles`) if the user holds any role: the actor is a User Administrator.
    pub only_without_roles: bool,
}
