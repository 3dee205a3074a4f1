//! [`CachedStore`]: users and directories by id from memory, for a process that owns its
//! SQLite file (see [`storage::db::Ownership`]) or that holds a lease on a PostgreSQL
//! database shared with other replicas (see [`storage::peers`]). Every authenticated call
//! loads its caller by id, so this takes the database off the path of Authorize, WhoAmI and
//! GetUser.
//!
//! Correctness rests on [`storage::cache::OwnedCache`]'s protocol: the writes that change a
//! cached user (SetUserRoles, DeleteUser, RestoreUser) hold a write guard until they have
//! committed (and,
//! on PostgreSQL, until every other replica's cache has dropped the user), so a role change or
//! a deletion applies to the next call exactly as it did without the cache.
//! New users and directories need no invalidation (absent rows are never cached), and a
//! directory row never changes once written.

use std::sync::Arc;

use async_trait::async_trait;
use storage::cache::{Invalidate, Lease, OwnedCache};
use storage::database::PeerCaches;

use super::{Actor, DirectoryStore, StoreError, Target};
use crate::domain::model::{DeletedUser, Directory, User};
use crate::domain::types::RoleSet;

pub struct CachedStore {
    inner: Arc<dyn DirectoryStore>,
    users: Arc<OwnedCache<User>>,
    directories: Arc<OwnedCache<Directory>>,
}

impl CachedStore {
    /// Caches up to `entries` users and as many directories in front of `inner`; with a
    /// `lease` (PostgreSQL), only while it is valid. Returns the store and the caches another
    /// replica's writes invalidate (`storage::database::Database::cache_in_front` registers
    /// them).
    pub fn in_front(
        inner: Arc<dyn DirectoryStore>,
        entries: usize,
        lease: Option<Arc<Lease>>,
    ) -> (Arc<dyn DirectoryStore>, PeerCaches) {
        let users = Arc::new(OwnedCache::with_lease(entries, lease.clone()));
        let directories = Arc::new(OwnedCache::with_lease(entries, lease));
        let caches: PeerCaches = vec![
            (
                super::sql::USERS.to_owned(),
                users.clone() as Arc<dyn Invalidate>,
            ),
            // Directory rows never change; listed so a new lease starts them empty too.
            (
                "directories".to_owned(),
                directories.clone() as Arc<dyn Invalidate>,
            ),
        ];
        let store = Self {
            inner,
            users,
            directories,
        };
        (Arc::new(store), caches)
    }
}

#[async_trait]
impl DirectoryStore for CachedStore {
    async fn create_directory(
        &self,
        directory: &Directory,
        admin: &User,
        password_hash: &str,
    ) -> Result<(), StoreError> {
        self.inner
            .create_directory(directory, admin, password_hash)
            .await
    }

    async fn directory(&self, id: &str) -> Result<Option<Directory>, StoreError> {
        self.directories
            .read_through(id, self.inner.directory(id))
            .await
    }

    async fn user(&self, id: &str) -> Result<Option<User>, StoreError> {
        self.users.read_through(id, self.inner.user(id)).await
    }

    async fn user_by_upn(&self, upn_key: &str) -> Result<Option<User>, StoreError> {
        self.inner.user_by_upn(upn_key).await
    }

    async fn credentials(&self, upn_key: &str) -> Result<Option<(User, String)>, StoreError> {
        self.inner.credentials(upn_key).await
    }

    async fn insert_user(
        &self,
        user: &User,
        password_hash: &str,
        actor: &Actor,
    ) -> Result<(), StoreError> {
        self.inner.insert_user(user, password_hash, actor).await
    }

    async fn list_users(
        &self,
        directory_id: &str,
        role_mask: i64,
        after_key: &str,
        limit: u32,
    ) -> Result<Vec<User>, StoreError> {
        self.inner
            .list_users(directory_id, role_mask, after_key, limit)
            .await
    }

    async fn set_roles(
        &self,
        directory_id: &str,
        user_id: &str,
        roles: RoleSet,
        actor: &Actor,
        now: i64,
    ) -> Result<User, StoreError> {
        let (inner, directory_id, id, actor) = (
            self.inner.clone(),
            directory_id.to_owned(),
            user_id.to_owned(),
            actor.clone(),
        );
        self.users
            .write_through(user_id, async move {
                inner
                    .set_roles(&directory_id, &id, roles, &actor, now)
                    .await
            })
            .await
    }

    async fn delete_user(
        &self,
        target: Target<'_>,
        actor: &Actor,
        delete_time: i64,
        purge_time: i64,
    ) -> Result<(), StoreError> {
        let (inner, owned, actor) = (self.inner.clone(), Owned::of(target), actor.clone());
        self.users
            .write_through(target.user_id, async move {
                inner
                    .delete_user(owned.target(), &actor, delete_time, purge_time)
                    .await
            })
            .await
    }

    async fn list_deleted_users(
        &self,
        directory_id: &str,
        now: i64,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<DeletedUser>, StoreError> {
        self.inner
            .list_deleted_users(directory_id, now, after, limit)
            .await
    }

    /// A restored user was absent, and absent rows are never cached; the guard still keeps a
    /// read that began before the restore from filling the cache with the row it replaced.
    async fn restore_user(
        &self,
        target: Target<'_>,
        new_upn: Option<&str>,
        actor: &Actor,
        now: i64,
    ) -> Result<User, StoreError> {
        let (inner, owned, actor) = (self.inner.clone(), Owned::of(target), actor.clone());
        let new_upn = new_upn.map(str::to_owned);
        self.users
            .write_through(target.user_id, async move {
                inner
                    .restore_user(owned.target(), new_upn.as_deref(), &actor, now)
                    .await
            })
            .await
    }

    /// Deleted users are never cached.
    async fn purge_user(
        &self,
        target: Target<'_>,
        actor: &Actor,
        now: i64,
    ) -> Result<(), StoreError> {
        self.inner.purge_user(target, actor, now).await
    }

    async fn purge_expired(&self, now: i64, limit: u32) -> Result<u64, StoreError> {
        self.inner.purge_expired(now, limit).await
    }
}

/// A [`Target`] owned, for a write the cache runs as a `'static` future.
struct Owned {
    directory_id: String,
    user_id: String,
    only_without_roles: bool,
}

impl Owned {
    fn of(target: Target<'_>) -> Self {
        Self {
            directory_id: target.directory_id.to_owned(),
            user_id: target.user_id.to_owned(),
            only_without_roles: target.only_without_roles,
        }
    }

    fn target(&self) -> Target<'_> {
        Target {
            directory_id: &self.directory_id,
            user_id: &self.user_id,
            only_without_roles: self.only_without_roles,
        }
    }
}
