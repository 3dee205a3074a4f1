//! The directory follower's place and effects (see `domain::follow`): the cursor moves,
//! compared with the one it moves from, in the transaction that applies the change's effect
//! on licences. Each effect locks in the order of `licences` (pools by offer, then assignment
//! rows, the change sequence last), after the cursor's row, which only the follower takes.
//!
//! A deletion writes the user's mark, then locks every pool the directory can have (creating
//! the missing ones empty, so a first purchase of an offer waits too), then sets the user's
//! assignments aside. An assignment (`licences::assign_batch`) locks its pool, then inserts
//! its row with a statement that skips users marked deleted. On PostgreSQL, if the
//! assignment locked the pool first, the deletion waits for its commit and then finds its
//! row; if the deletion locked the pools first, the assignment waits for its commit, and its
//! insert (whose snapshot is taken after that wait) finds the mark. Either way the assignment
//! does not outlive the deletion.

use async_trait::async_trait;
use sqlx::{Any, Transaction};
use storage::feed::NewChange;

use super::super::changes;
use super::SqlStore;
use super::licences::{FREE_SEAT, TAKE_SEAT, assignment_from_row};
use crate::domain::follow::{FollowerStore, UserChange, UserRef};
use crate::domain::licences::licensable;
use crate::domain::model::{Assignment, ChangeKind};
use crate::domain::offers;
use crate::store::StoreError;

/// Marks the user as deleted.
const MARK_DELETED: &str = "INSERT INTO deleted_license_users (user_id, directory_id) \
     VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING";

#[async_trait]
impl FollowerStore for SqlStore {
    async fn hold(&self, ttl: std::time::Duration) -> Result<bool, StoreError> {
        Ok(self.lease.hold(ttl).await?)
    }

    async fn release(&self) -> Result<(), StoreError> {
        Ok(self.lease.release().await?)
    }

    async fn position(&self) -> Result<String, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT last_cursor FROM directory_follower WHERE id = 1")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn advance(
        &self,
        from: &str,
        to: &str,
        change: Option<&UserChange>,
        now: i64,
    ) -> Result<bool, StoreError> {
        let turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "UPDATE directory_follower SET last_cursor = $1 WHERE id = 1 AND last_cursor = $2",
        )
        .bind(to)
        .bind(from)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        let recorded = match change {
            None => Vec::new(),
            Some(UserChange::Deleted(user)) => set_aside(&mut tx, user, now).await?,
            Some(UserChange::Restored(user)) => give_back(&mut tx, user, now).await?,
            Some(UserChange::Purged(user)) => {
                // Gone for good: as a deletion (which frees what is still assigned, if the
                // deletion itself was missed), then what was set aside goes too.
                let removed = set_aside(&mut tx, user, now).await?;
                sqlx::query("DELETE FROM licenses_set_aside WHERE user_id = $1")
                    .bind(&user.user_id)
                    .execute(&mut *tx)
                    .await?;
                removed
            }
        };
        self.outbox.record(&mut tx, &recorded).await?;
        tx.commit().await?;
        drop(turn);
        if !recorded.is_empty() {
            self.outbox.committed();
        }
        Ok(true)
    }
}

/// Locks every pool the directory can have, in offer order (this module's lock order): one
/// row per per-seat Office 365 offer, created empty where the directory has none yet, so a
/// purchase that would create one waits too. An assignment locks its pool before it reads
/// the deletion marks, so none can slip past a deletion holding these.
async fn lock_pools(tx: &mut Transaction<'_, Any>, directory_id: &str) -> sqlx::Result<()> {
    let mut offers: Vec<&str> = offers::CATALOGUE
        .iter()
        .filter(|offer| licensable(offer))
        .map(|offer| offer.id)
        .collect();
    offers.sort_unstable();
    for offer in offers {
        sqlx::query(
            "INSERT INTO license_pools (directory_id, offer_id, enabled, consumed) \
             VALUES ($1, $2, 0, 0) ON CONFLICT (directory_id, offer_id) \
             DO UPDATE SET consumed = license_pools.consumed",
        )
        .bind(directory_id)
        .bind(offer)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn mark(tx: &mut Transaction<'_, Any>, user: &UserRef, deleted: bool) -> sqlx::Result<()> {
    if deleted {
        sqlx::query(MARK_DELETED)
            .bind(&user.user_id)
            .bind(&user.directory_id)
            .execute(&mut **tx)
            .await?;
    } else {
        sqlx::query("DELETE FROM deleted_license_users WHERE user_id = $1")
            .bind(&user.user_id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// A deleted user's assignments leave the pools (their seats freed) for the set-aside table;
/// each is a `LICENSE_REMOVED`.
async fn set_aside(
    tx: &mut Transaction<'_, Any>,
    user: &UserRef,
    now: i64,
) -> sqlx::Result<Vec<NewChange>> {
    mark(tx, user, true).await?;
    lock_pools(tx, &user.directory_id).await?;
    let rows = sqlx::query(
        "DELETE FROM license_assignments WHERE directory_id = $1 AND user_id = $2 \
         RETURNING directory_id, user_id, offer_id, assign_time",
    )
    .bind(&user.directory_id)
    .bind(&user.user_id)
    .fetch_all(&mut **tx)
    .await?;
    let mut removed = rows
        .iter()
        .map(assignment_from_row)
        .collect::<Result<Vec<Assignment>, _>>()?;
    removed.sort_by_key(|a| a.offer.id);
    let mut recorded = Vec::with_capacity(removed.len());
    for a in &removed {
        sqlx::query(FREE_SEAT)
            .bind(&a.directory_id)
            .bind(a.offer.id)
            .execute(&mut **tx)
            .await?;
        sqlx::query(
            "INSERT INTO licenses_set_aside (directory_id, user_id, offer_id, assign_time) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (user_id, offer_id) \
             DO UPDATE SET assign_time = excluded.assign_time",
        )
        .bind(&a.directory_id)
        .bind(&a.user_id)
        .bind(a.offer.id)
        .bind(a.assign_time)
        .execute(&mut **tx)
        .await?;
        recorded.push(changes::assignment(ChangeKind::LicenseRemoved, a, now)?);
    }
    Ok(recorded)
}

/// A restored user's set-aside assignments come back (as they were) while their pools have
/// a free seat, each a `LICENSE_ASSIGNED`; the others are dropped.
async fn give_back(
    tx: &mut Transaction<'_, Any>,
    user: &UserRef,
    now: i64,
) -> sqlx::Result<Vec<NewChange>> {
    mark(tx, user, false).await?;
    let rows = sqlx::query(
        "DELETE FROM licenses_set_aside WHERE user_id = $1 \
         RETURNING directory_id, user_id, offer_id, assign_time",
    )
    .bind(&user.user_id)
    .fetch_all(&mut **tx)
    .await?;
    let mut kept = rows
        .iter()
        .map(assignment_from_row)
        .collect::<Result<Vec<Assignment>, _>>()?;
    kept.sort_by_key(|a| a.offer.id);
    // Pool by pool (this module's lock order: the pool, then the row): a seat, then the row;
    // a row the user holds already (assigned since the restore) gives its seat back.
    let mut recorded = Vec::with_capacity(kept.len());
    for a in &kept {
        let took = sqlx::query(TAKE_SEAT)
            .bind(&a.directory_id)
            .bind(a.offer.id)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        if took == 0 {
            continue;
        }
        let inserted = sqlx::query(
            "INSERT INTO license_assignments (directory_id, user_id, offer_id, assign_time) \
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(&a.directory_id)
        .bind(&a.user_id)
        .bind(a.offer.id)
        .bind(a.assign_time)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            sqlx::query(FREE_SEAT)
                .bind(&a.directory_id)
                .bind(a.offer.id)
                .execute(&mut **tx)
                .await?;
            continue;
        }
        recorded.push(changes::assignment(ChangeKind::LicenseAssigned, a, now)?);
    }
    Ok(recorded)
}
