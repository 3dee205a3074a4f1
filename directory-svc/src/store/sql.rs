//! [`DirectoryStore`] over sqlx's `Any` driver: one set of SQL for SQLite and PostgreSQL.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row as _};
use storage::batch::PointReads;
use storage::db::{Engine, WriteGate};
use storage::feed::Outbox;
use storage::peers::Peers;

use super::changes;
use super::{Actor, DirectoryStore, StoreError, Target};
use crate::domain::model::{ChangeKind, DeletedUser, Directory, User};
use crate::domain::types::{Role, RoleSet};

/// Migrations embedded in the binary, run at start.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    writers: WriteGate,
    /// Users by id, the read every authenticated call makes, coalesced.
    users: PointReads<User>,
    /// On PostgreSQL, the replicas whose caches a change to a user must reach before it is
    /// acknowledged.
    peers: Option<Arc<Peers>>,
    /// The change feed's outbox every write records its changes in.
    outbox: Outbox,
}

const USER_COLUMNS: &str =
    "id, directory_id, upn, display_name, roles, create_time, token_generation";

/// The kind of row the caches of users are invalidated by.
pub const USERS: &str = "users";

impl SqlStore {
    /// Wraps an open pool on `engine` and brings its schema up to date.
    pub async fn new(pool: AnyPool, engine: Engine) -> anyhow::Result<Self> {
        MIGRATOR.run(&pool).await?;
        let writers = WriteGate::for_engine(engine);
        writers.checkpoint_in_background(&pool);
        let users = PointReads::start(
            pool.clone(),
            format!("SELECT {USER_COLUMNS} FROM users WHERE id IN"),
            |row| user_from_row(row).map(|user| (user.id.clone(), user)),
        );
        Ok(Self {
            pool,
            writers,
            users,
            peers: None,
            outbox: Outbox::new(engine),
        })
    }

    /// Announces every change to a user to `peers` and waits for them before answering.
    pub fn with_peers(self, peers: Arc<Peers>) -> Self {
        Self {
            peers: Some(peers),
            ..self
        }
    }

    /// Within the transaction changing the user `id`: tells the replicas' caches.
    async fn announce(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        id: &str,
    ) -> Result<(), sqlx::Error> {
        match &self.peers {
            Some(_) => storage::peers::announce(tx, USERS, id).await,
            None => Ok(()),
        }
    }

    /// After that transaction committed: waits until the replicas' caches have dropped the
    /// old row.
    async fn settle(&self) {
        if let Some(peers) = &self.peers {
            peers.settle().await;
        }
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The outbox this store's writes record their changes in.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }
}

fn user_from_row(row: &AnyRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: row.try_get("id")?,
        directory_id: row.try_get("directory_id")?,
        upn: row.try_get("upn")?,
        display_name: row.try_get("display_name")?,
        roles: RoleSet::from_bits(row.try_get("roles")?),
        create_time: row.try_get("create_time")?,
        token_generation: u32::try_from(row.try_get::<i64, _>("token_generation")?)
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
    })
}

fn deleted_user_from_row(row: &AnyRow) -> Result<DeletedUser, sqlx::Error> {
    Ok(DeletedUser {
        user: user_from_row(row)?,
        delete_time: row.try_get("delete_time")?,
        purge_time: row.try_get("purge_time")?,
    })
}

fn directory_from_row(row: &AnyRow) -> Result<Directory, sqlx::Error> {
    Ok(Directory {
        id: row.try_get("id")?,
        display_name: row.try_get("display_name")?,
        domain_prefix: row.try_get("domain_prefix")?,
        initial_domain: row.try_get("initial_domain")?,
        create_time: row.try_get("create_time")?,
    })
}

fn on_unique(err: sqlx::Error, conflict: StoreError) -> StoreError {
    if storage::db::is_unique_violation(&err) {
        conflict
    } else {
        StoreError::from(err)
    }
}

const GLOBAL_ADMINS: &str =
    "SELECT COUNT(*) FROM users WHERE directory_id = $1 AND (roles & $2) <> 0";

/// Serialises writers of one directory: the first statement of a role-changing transaction.
/// On PostgreSQL it takes the directory's row lock; on SQLite any write takes the database's
/// write lock, so the transaction never has to upgrade a read lock.
const LOCK_DIRECTORY: &str = "UPDATE directories SET lock_version = lock_version + 1 WHERE id = $1";

/// Locks the directory for this transaction and checks that `actor` still holds exactly the
/// roles the decision was made with.
async fn lock_for(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    directory_id: &str,
    actor: &Actor,
) -> Result<(), StoreError> {
    sqlx::query(LOCK_DIRECTORY)
        .bind(directory_id)
        .execute(&mut **tx)
        .await?;
    let roles: Option<i64> =
        sqlx::query_scalar("SELECT roles FROM users WHERE id = $1 AND directory_id = $2")
            .bind(&actor.id)
            .bind(directory_id)
            .fetch_optional(&mut **tx)
            .await?;
    match roles.map(RoleSet::from_bits) {
        None => Err(StoreError::ActorChanged(None)),
        Some(now) if now != actor.roles => Err(StoreError::ActorChanged(Some(now))),
        Some(_) => Ok(()),
    }
}

async fn global_admins(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    directory_id: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(GLOBAL_ADMINS)
        .bind(directory_id)
        .bind(RoleSet::mask_of(Role::GlobalAdministrator))
        .fetch_one(&mut **tx)
        .await
}

#[async_trait]
impl DirectoryStore for SqlStore {
    async fn create_directory(
        &self,
        directory: &Directory,
        admin: &User,
        password_hash: &str,
    ) -> Result<(), StoreError> {
        let _turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO directories (id, display_name, domain_prefix, initial_domain, create_time, lock_version) \
             VALUES ($1, $2, $3, $4, $5, 0)",
        )
        .bind(&directory.id)
        .bind(&directory.display_name)
        .bind(&directory.domain_prefix)
        .bind(&directory.initial_domain)
        .bind(directory.create_time)
        .execute(&mut *tx)
        .await
        .map_err(|e| on_unique(e, StoreError::DomainTaken))?;
        insert_user(&mut tx, admin, password_hash).await?;
        let recorded = [
            changes::directory(
                ChangeKind::DirectoryCreated,
                directory,
                directory.create_time,
            )?,
            changes::user(ChangeKind::UserCreated, admin, directory.create_time)?,
        ];
        self.outbox.record(&mut tx, &recorded).await?;
        tx.commit().await?;
        self.outbox.committed();
        Ok(())
    }

    async fn directory(&self, id: &str) -> Result<Option<Directory>, StoreError> {
        let row = sqlx::query(
            "SELECT id, display_name, domain_prefix, initial_domain, create_time FROM directories WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(directory_from_row).transpose()?)
    }

    async fn user(&self, id: &str) -> Result<Option<User>, StoreError> {
        Ok(self.users.get(id).await?)
    }

    async fn user_by_upn(&self, upn_key: &str) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(
            "SELECT id, directory_id, upn, display_name, roles, create_time, token_generation FROM users WHERE upn_key = $1",
        )
        .bind(upn_key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(user_from_row).transpose()?)
    }

    async fn credentials(&self, upn_key: &str) -> Result<Option<(User, String)>, StoreError> {
        let row = sqlx::query(
            "SELECT id, directory_id, upn, display_name, roles, create_time, token_generation, password_hash FROM users WHERE upn_key = $1",
        )
        .bind(upn_key)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some(row) => Ok(Some((user_from_row(&row)?, row.try_get("password_hash")?))),
        }
    }

    async fn insert_user(
        &self,
        user: &User,
        password_hash: &str,
        actor: &Actor,
    ) -> Result<(), StoreError> {
        let _turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        lock_for(&mut tx, &user.directory_id, actor).await?;
        insert_user(&mut tx, user, password_hash).await?;
        let recorded = [changes::user(
            ChangeKind::UserCreated,
            user,
            user.create_time,
        )?];
        self.outbox.record(&mut tx, &recorded).await?;
        tx.commit().await?;
        self.outbox.committed();
        Ok(())
    }

    async fn list_users(
        &self,
        directory_id: &str,
        role_mask: i64,
        after_key: &str,
        limit: u32,
    ) -> Result<Vec<User>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, directory_id, upn, display_name, roles, create_time, token_generation FROM users \
             WHERE directory_id = $1 AND upn_key > $2 AND ($3 = 0 OR (roles & $3) <> 0) \
             ORDER BY upn_key LIMIT $4",
        )
        .bind(directory_id)
        .bind(after_key)
        .bind(role_mask)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(user_from_row).collect::<Result<_, _>>()?)
    }

    async fn set_roles(
        &self,
        directory_id: &str,
        user_id: &str,
        roles: RoleSet,
        actor: &Actor,
        now: i64,
    ) -> Result<User, StoreError> {
        let _turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        lock_for(&mut tx, directory_id, actor).await?;
        let before: Option<i64> =
            sqlx::query_scalar("SELECT roles FROM users WHERE id = $1 AND directory_id = $2")
                .bind(user_id)
                .bind(directory_id)
                .fetch_optional(&mut *tx)
                .await?;
        let updated =
            sqlx::query("UPDATE users SET roles = $1 WHERE id = $2 AND directory_id = $3")
                .bind(roles.bits())
                .bind(user_id)
                .bind(directory_id)
                .execute(&mut *tx)
                .await?;
        if updated.rows_affected() == 0 {
            drop(tx);
            drop(_turn);
            self.settle().await; // as in delete_user
            return Err(StoreError::UserNotFound);
        }
        if global_admins(&mut tx, directory_id).await? == 0 {
            return Err(StoreError::LastGlobalAdministrator);
        }
        let row = sqlx::query(
            "SELECT id, directory_id, upn, display_name, roles, create_time, token_generation FROM users WHERE id = $1",
        )
        .bind(user_id)
        .fetch_one(&mut *tx)
        .await?;
        let user = user_from_row(&row)?;
        // The same roles again: the user is returned unchanged, and nothing is recorded.
        if before.map(RoleSet::from_bits) != Some(user.roles) {
            let recorded = [changes::user(ChangeKind::UserRolesChanged, &user, now)?];
            self.outbox.record(&mut tx, &recorded).await?;
        }
        self.announce(&mut tx, user_id).await?;
        tx.commit().await?;
        self.outbox.committed();
        drop(_turn);
        self.settle().await;
        Ok(user)
    }

    async fn delete_user(
        &self,
        target: Target<'_>,
        actor: &Actor,
        delete_time: i64,
        purge_time: i64,
    ) -> Result<(), StoreError> {
        let Target {
            directory_id,
            user_id,
            only_without_roles,
        } = target;
        let _turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        lock_for(&mut tx, directory_id, actor).await?;
        let row = sqlx::query(
            "SELECT id, directory_id, upn, display_name, roles, create_time, token_generation FROM users \
             WHERE id = $1 AND directory_id = $2",
        )
        .bind(user_id)
        .bind(directory_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            // Perhaps deleted by a call that has not answered yet: answer only once every
            // replica's cache has let the user go.
            drop(tx);
            drop(_turn);
            self.settle().await;
            return Err(StoreError::UserNotFound);
        };
        let user = user_from_row(&row)?;
        if only_without_roles && !user.roles.is_empty() {
            return Err(StoreError::HasRoles);
        }
        sqlx::query(
            "INSERT INTO deleted_users (id, directory_id, upn, upn_key, display_name, password_hash, roles, create_time, token_generation, delete_time, purge_time) \
             SELECT id, directory_id, upn, upn_key, display_name, password_hash, roles, create_time, token_generation, $3, $4 \
             FROM users WHERE id = $1 AND directory_id = $2",
        )
        .bind(user_id)
        .bind(directory_id)
        .bind(delete_time)
        .bind(purge_time)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM users WHERE id = $1 AND directory_id = $2")
            .bind(user_id)
            .bind(directory_id)
            .execute(&mut *tx)
            .await?;
        if global_admins(&mut tx, directory_id).await? == 0 {
            return Err(StoreError::LastGlobalAdministrator);
        }
        let deleted = DeletedUser {
            user,
            delete_time,
            purge_time,
        };
        let recorded = [changes::deleted_user(
            ChangeKind::UserDeleted,
            &deleted,
            delete_time,
        )?];
        self.outbox.record(&mut tx, &recorded).await?;
        self.announce(&mut tx, user_id).await?;
        tx.commit().await?;
        self.outbox.committed();
        drop(_turn);
        self.settle().await;
        Ok(())
    }

    async fn list_deleted_users(
        &self,
        directory_id: &str,
        now: i64,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<DeletedUser>, StoreError> {
        let (after_key, after_id) = after.unwrap_or(("", ""));
        let rows = sqlx::query(
            "SELECT id, directory_id, upn, display_name, roles, create_time, token_generation, delete_time, purge_time \
             FROM deleted_users \
             WHERE directory_id = $1 AND purge_time > $2 AND (upn_key > $3 OR (upn_key = $3 AND id > $4)) \
             ORDER BY upn_key, id LIMIT $5",
        )
        .bind(directory_id)
        .bind(now)
        .bind(after_key)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(deleted_user_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn restore_user(
        &self,
        target: Target<'_>,
        new_upn: Option<&str>,
        actor: &Actor,
        now: i64,
    ) -> Result<User, StoreError> {
        let _turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        lock_for(&mut tx, target.directory_id, actor).await?;
        // Taking the row out is the claim: a purge racing this restore deletes it first (and
        // this finds nothing) or finds nothing itself.
        let Some(row) = take_deleted(&mut tx, target, now).await? else {
            return Err(StoreError::UserNotFound);
        };
        let deleted = user_from_row(&row)?;
        if target.only_without_roles && !deleted.roles.is_empty() {
            return Err(StoreError::HasRoles);
        }
        let password_hash: String = row.try_get("password_hash")?;
        let old_upn = deleted.upn.clone();
        let user = User {
            upn: new_upn.map_or(deleted.upn.clone(), str::to_owned),
            token_generation: deleted.token_generation.wrapping_add(1),
            ..deleted
        };
        match insert_user(&mut tx, &user, &password_hash).await {
            Err(StoreError::UpnTaken) if new_upn.is_none() => {
                return Err(StoreError::OldUpnTaken(old_upn));
            }
            other => other?,
        }
        let recorded = [changes::user(ChangeKind::UserRestored, &user, now)?];
        self.outbox.record(&mut tx, &recorded).await?;
        self.announce(&mut tx, &user.id).await?;
        tx.commit().await?;
        self.outbox.committed();
        drop(_turn);
        self.settle().await;
        Ok(user)
    }

    async fn purge_user(
        &self,
        target: Target<'_>,
        actor: &Actor,
        now: i64,
    ) -> Result<(), StoreError> {
        let _turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        lock_for(&mut tx, target.directory_id, actor).await?;
        let Some(row) = take_deleted(&mut tx, target, now).await? else {
            return Err(StoreError::UserNotFound);
        };
        let deleted = deleted_user_from_row(&row)?;
        if target.only_without_roles && !deleted.user.roles.is_empty() {
            return Err(StoreError::HasRoles);
        }
        let recorded = [changes::deleted_user(
            ChangeKind::UserPurged,
            &deleted,
            now,
        )?];
        self.outbox.record(&mut tx, &recorded).await?;
        tx.commit().await?;
        self.outbox.committed();
        Ok(())
    }

    async fn purge_expired(&self, now: i64, limit: u32) -> Result<u64, StoreError> {
        let _turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "DELETE FROM deleted_users WHERE id IN \
             (SELECT id FROM deleted_users WHERE purge_time <= $1 ORDER BY purge_time LIMIT $2) \
             RETURNING id, directory_id, upn, display_name, roles, create_time, token_generation, delete_time, purge_time",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        // Each purged user's change, in the order of their purge times.
        let mut purged = rows
            .iter()
            .map(deleted_user_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        purged.sort_by(|a, b| (a.purge_time, &a.user.id).cmp(&(b.purge_time, &b.user.id)));
        let recorded = purged
            .iter()
            .map(|deleted| changes::deleted_user(ChangeKind::UserPurged, deleted, now))
            .collect::<Result<Vec<_>, _>>()?;
        self.outbox.record(&mut tx, &recorded).await?;
        tx.commit().await?;
        self.outbox.committed();
        Ok(purged.len() as u64)
    }
}

/// Takes a deleted user out of the recycle bin within `tx`, if it is there and not past its
/// purge time: the row, with its password hash.
async fn take_deleted(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    target: Target<'_>,
    now: i64,
) -> Result<Option<AnyRow>, sqlx::Error> {
    sqlx::query(
        "DELETE FROM deleted_users WHERE id = $1 AND directory_id = $2 AND purge_time > $3 \
         RETURNING id, directory_id, upn, display_name, roles, create_time, token_generation, delete_time, purge_time, password_hash",
    )
    .bind(target.user_id)
    .bind(target.directory_id)
    .bind(now)
    .fetch_optional(&mut **tx)
    .await
}

async fn insert_user(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    user: &User,
    password_hash: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO users (id, directory_id, upn, upn_key, display_name, password_hash, roles, create_time, token_generation) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&user.id)
    .bind(&user.directory_id)
    .bind(&user.upn)
    .bind(user.upn_key())
    .bind(&user.display_name)
    .bind(password_hash)
    .bind(user.roles.bits())
    .bind(user.create_time)
    .bind(i64::from(user.token_generation))
    .execute(&mut **tx)
    .await
    .map_err(|e| on_unique(e, StoreError::UpnTaken))?;
    Ok(())
}
