//! Licences in the database. The pool invariant (`consumed <= enabled`, per directory and
//! offer) is the database's: a `CHECK` on `license_pools` refuses any row that breaks it, and
//! every write moves a pool's counts with one conditional `UPDATE` (`... WHERE consumed <
//! enabled`) that the database evaluates on the row as it is once locked, so concurrent
//! writers on any number of replicas cannot both take the last seat.
//!
//! Locks are taken in one order by every transaction, so none waits on another in a circle
//! (PostgreSQL; SQLite has one writer): a user's `license_users` row, then a subscription
//! row, then pool rows (by directory and offer), then assignment rows, then the change
//! sequence (the outbox, last).

use sqlx::any::AnyRow;
use sqlx::{Any, AssertSqlSafe, Row as _, Transaction};

use super::super::changes;
use super::{SqlStore, corrupt};
use crate::domain::model::{Assigned, Assignment, ChangeKind, License, SeatsChanged, State};
use crate::domain::offers;
use crate::store::StoreError;

/// Marks the user as one billing has seen alive, and locks its row: `false` when billing
/// has seen it deleted (see `domain::follow`). An assignment racing the user's deletion waits here
/// for it (or it for the assignment), so the two never overlap.
const LOCK_LIVE_USER: &str = "INSERT INTO license_users (user_id, directory_id, deleted) \
     VALUES ($1, $2, 0) ON CONFLICT (user_id) DO UPDATE SET deleted = 0 \
     WHERE license_users.deleted = 0";

/// Takes a seat, if one is free.
pub(super) const TAKE_SEAT: &str = "UPDATE license_pools SET consumed = consumed + 1 \
     WHERE directory_id = $1 AND offer_id = $2 AND consumed < enabled";

/// Gives a seat back.
pub(super) const FREE_SEAT: &str = "UPDATE license_pools SET consumed = consumed - 1 \
     WHERE directory_id = $1 AND offer_id = $2";

/// Adds `$3` seats (negative: removes them), unless the assigned licences need them.
const MOVE_SEATS: &str = "UPDATE license_pools SET enabled = enabled + $3 \
     WHERE directory_id = $1 AND offer_id = $2 AND consumed <= enabled + $3";

/// Adds seats a purchase brought, creating the pool with the directory's first purchase of
/// the offer.
pub(super) const ADD_POOL_SEATS: &str = "INSERT INTO license_pools (directory_id, offer_id, enabled, consumed) \
     VALUES ($1, $2, $3, 0) ON CONFLICT (directory_id, offer_id) \
     DO UPDATE SET enabled = license_pools.enabled + excluded.enabled";

/// Pages of a directory's assignments, by user then offer (the primary key's order, or
/// `license_assignments_by_offer`'s for one offer).
const LIST_ALL: &str = "SELECT directory_id, user_id, offer_id, assign_time FROM license_assignments \
     WHERE directory_id = $1 AND (user_id > $2 OR (user_id = $2 AND offer_id > $3)) \
     ORDER BY user_id, offer_id LIMIT $4";
const LIST_USER: &str = "SELECT directory_id, user_id, offer_id, assign_time FROM license_assignments \
     WHERE directory_id = $1 AND user_id = $2 AND offer_id > $3 \
     ORDER BY user_id, offer_id LIMIT $4";
const LIST_OFFER: &str = "SELECT directory_id, user_id, offer_id, assign_time FROM license_assignments \
     WHERE directory_id = $1 AND offer_id = $2 AND user_id > $3 \
     ORDER BY user_id, offer_id LIMIT $4";
const LIST_ONE: &str = "SELECT directory_id, user_id, offer_id, assign_time FROM license_assignments \
     WHERE directory_id = $1 AND user_id = $2 AND offer_id = $3 AND offer_id > $4 LIMIT $5";

pub(super) fn assignment_from_row(row: &AnyRow) -> Result<Assignment, sqlx::Error> {
    let offer_id: String = row.try_get("offer_id")?;
    Ok(Assignment {
        user_id: row.try_get("user_id")?,
        offer: offers::find(&offer_id)
            .ok_or_else(|| corrupt(format!("unknown offer {offer_id}")))?,
        directory_id: row.try_get("directory_id")?,
        assign_time: row.try_get("assign_time")?,
    })
}

/// Ends a transaction that changed nothing it should keep.
async fn undo<T>(tx: Transaction<'_, Any>, outcome: T) -> Result<T, StoreError> {
    tx.rollback().await?;
    Ok(outcome)
}

impl SqlStore {
    pub(super) async fn assign_seat(&self, a: &Assignment) -> Result<Assigned, StoreError> {
        let turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        let alive = sqlx::query(LOCK_LIVE_USER)
            .bind(&a.user_id)
            .bind(&a.directory_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if alive == 0 {
            return undo(tx, Assigned::UserDeleted).await;
        }
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT assign_time FROM license_assignments \
             WHERE directory_id = $1 AND user_id = $2 AND offer_id = $3",
        )
        .bind(&a.directory_id)
        .bind(&a.user_id)
        .bind(a.offer.id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(assign_time) = held {
            let held = Assignment {
                assign_time,
                ..a.clone()
            };
            return undo(tx, Assigned::Held(held)).await;
        }
        let took = sqlx::query(TAKE_SEAT)
            .bind(&a.directory_id)
            .bind(a.offer.id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if took == 0 {
            return undo(tx, Assigned::NoSeat).await;
        }
        sqlx::query(
            "INSERT INTO license_assignments (directory_id, user_id, offer_id, assign_time) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&a.directory_id)
        .bind(&a.user_id)
        .bind(a.offer.id)
        .bind(a.assign_time)
        .execute(&mut *tx)
        .await?;
        let change = changes::assignment(ChangeKind::LicenseAssigned, a, a.assign_time)?;
        self.outbox.record(&mut tx, &[change]).await?;
        tx.commit().await?;
        drop(turn);
        self.outbox.committed();
        Ok(Assigned::New(a.clone()))
    }

    pub(super) async fn free_seat(
        &self,
        directory_id: &str,
        user_id: &str,
        offer_id: &str,
        now: i64,
    ) -> Result<Option<Assignment>, StoreError> {
        let turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        let removed = sqlx::query(
            "DELETE FROM license_assignments \
             WHERE directory_id = $1 AND user_id = $2 AND offer_id = $3 \
             RETURNING directory_id, user_id, offer_id, assign_time",
        )
        .bind(directory_id)
        .bind(user_id)
        .bind(offer_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(removed) = removed.as_ref().map(assignment_from_row).transpose()? else {
            return undo(tx, None).await;
        };
        sqlx::query(FREE_SEAT)
            .bind(directory_id)
            .bind(offer_id)
            .execute(&mut *tx)
            .await?;
        let change = changes::assignment(ChangeKind::LicenseRemoved, &removed, now)?;
        self.outbox.record(&mut tx, &[change]).await?;
        tx.commit().await?;
        drop(turn);
        self.outbox.committed();
        Ok(Some(removed))
    }

    pub(super) async fn pools(&self, directory_id: &str) -> Result<Vec<License>, StoreError> {
        let rows = sqlx::query(
            "SELECT offer_id, enabled, consumed FROM license_pools \
             WHERE directory_id = $1 AND (enabled > 0 OR consumed > 0) ORDER BY offer_id",
        )
        .bind(directory_id)
        .fetch_all(&self.pool)
        .await?;
        let license = |row: &AnyRow| -> Result<License, sqlx::Error> {
            let offer_id: String = row.try_get("offer_id")?;
            Ok(License {
                offer: offers::find(&offer_id)
                    .ok_or_else(|| corrupt(format!("unknown offer {offer_id}")))?,
                enabled: row.try_get("enabled")?,
                consumed: row.try_get("consumed")?,
            })
        };
        Ok(rows.iter().map(license).collect::<Result<_, _>>()?)
    }

    pub(super) async fn assignment_page(
        &self,
        directory_id: &str,
        user_id: Option<&str>,
        offer_id: Option<&str>,
        after: Option<(String, String)>,
        limit: u32,
    ) -> Result<Vec<Assignment>, StoreError> {
        let (after_user, after_offer) = after.unwrap_or_default();
        let query = match (user_id, offer_id) {
            (None, None) => sqlx::query(LIST_ALL)
                .bind(directory_id)
                .bind(after_user)
                .bind(after_offer),
            (Some(user), None) => sqlx::query(LIST_USER)
                .bind(directory_id)
                .bind(user.to_owned())
                .bind(after_offer),
            (None, Some(offer)) => sqlx::query(LIST_OFFER)
                .bind(directory_id)
                .bind(offer.to_owned())
                .bind(after_user),
            (Some(user), Some(offer)) => sqlx::query(LIST_ONE)
                .bind(directory_id)
                .bind(user.to_owned())
                .bind(offer.to_owned())
                .bind(after_offer),
        };
        let rows = query.bind(i64::from(limit)).fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(assignment_from_row)
            .collect::<Result<_, _>>()?)
    }

    pub(super) async fn set_seats(
        &self,
        id: &str,
        seats: i32,
        now: i64,
    ) -> Result<Option<SeatsChanged>, StoreError> {
        let turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        // Locks the row and reads it as committed now (PostgreSQL re-reads a row another
        // transaction changed while this one waited for it).
        let current = sqlx::query(AssertSqlSafe(format!(
            "UPDATE subscriptions SET seats = seats WHERE id = $1 RETURNING {}",
            super::SELECT_COLUMNS
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(super::subscription_from_row)
        .transpose()?;
        let Some(current) = current else {
            return undo(tx, None).await;
        };
        if current.state != State::Active {
            return undo(tx, Some(SeatsChanged::NotActive)).await;
        }
        if !crate::domain::licences::licensable(current.offer) {
            return undo(tx, Some(SeatsChanged::NotPerSeat)).await;
        }
        if current.seats == seats {
            return undo(tx, Some(SeatsChanged::Unchanged(current))).await;
        }
        let delta = i64::from(seats) - i64::from(current.seats);
        if !move_seats(&mut tx, &current.directory_id, current.offer.id, delta).await? {
            return undo(tx, Some(SeatsChanged::InUse)).await;
        }
        sqlx::query("UPDATE subscriptions SET seats = $1 WHERE id = $2")
            .bind(i64::from(seats))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let changed = crate::domain::model::Subscription { seats, ..current };
        if self.peers.is_some() {
            storage::peers::announce(&mut tx, super::SUBSCRIPTIONS, id).await?;
        }
        let change = changes::subscription(ChangeKind::SubscriptionUpdated, &changed, now)?;
        self.outbox.record(&mut tx, &[change]).await?;
        tx.commit().await?;
        drop(turn);
        self.outbox.committed();
        if let Some(peers) = &self.peers {
            peers.settle().await;
        }
        Ok(Some(SeatsChanged::Changed(changed)))
    }
}

/// Moves a pool's seats by `delta` (in a transaction that locked the subscription they come
/// from or go to): `false` when the pool's assigned licences need more than it would keep.
pub(super) async fn move_seats(
    tx: &mut Transaction<'_, Any>,
    directory_id: &str,
    offer_id: &str,
    delta: i64,
) -> Result<bool, sqlx::Error> {
    let moved = sqlx::query(MOVE_SEATS)
        .bind(directory_id)
        .bind(offer_id)
        .bind(delta)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    Ok(moved == 1)
}
