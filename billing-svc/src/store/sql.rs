//! [`BillingStore`] over sqlx's `Any` driver: one set of SQL for SQLite and PostgreSQL.

use async_trait::async_trait;
use contract::db::{Engine, WriteGate};
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row as _};

use super::{BillingStore, StoreError};
use crate::domain::model::{State, Subscription};
use crate::domain::offers;

/// Migrations embedded in the binary, run at start.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    writers: WriteGate,
}

impl SqlStore {
    /// Wraps an open pool on `engine` and brings its schema up to date.
    pub async fn new(pool: AnyPool, engine: Engine) -> anyhow::Result<Self> {
        MIGRATOR.run(&pool).await?;
        Ok(Self {
            pool,
            writers: WriteGate::for_engine(engine),
        })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

fn corrupt(what: String) -> sqlx::Error {
    sqlx::Error::Decode(what.into())
}

fn subscription_from_row(row: &AnyRow) -> Result<Subscription, sqlx::Error> {
    let offer_id: String = row.try_get("offer_id")?;
    let state: i64 = row.try_get("state")?;
    let seats: i64 = row.try_get("seats")?;
    Ok(Subscription {
        id: row.try_get("id")?,
        offer: offers::find(&offer_id)
            .ok_or_else(|| corrupt(format!("unknown offer {offer_id}")))?,
        display_name: row.try_get("display_name")?,
        directory_id: row.try_get("directory_id")?,
        owner_user_id: row.try_get("owner_user_id")?,
        seats: i32::try_from(seats).map_err(|_| corrupt(format!("seats {seats}")))?,
        state: State::from_code(state).ok_or_else(|| corrupt(format!("state {state}")))?,
        created_by_user_id: row.try_get("created_by_user_id")?,
        create_time: row.try_get("create_time")?,
        cancel_time: row.try_get("cancel_time")?,
    })
}

#[async_trait]
impl BillingStore for SqlStore {
    async fn insert(
        &self,
        s: &Subscription,
        request: Option<(&str, &str)>,
    ) -> Result<(), StoreError> {
        let (request_id, fingerprint) = request.unzip();
        let free_trial_user = s.offer.free_trial.then_some(s.created_by_user_id.as_str());
        let _turn = self.writers.enter().await;
        sqlx::query(
            "INSERT INTO subscriptions (id, offer_id, display_name, directory_id, owner_user_id, seats, state, \
             created_by_user_id, create_time, cancel_time, request_id, request_fingerprint, free_trial_user_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&s.id)
        .bind(s.offer.id)
        .bind(&s.display_name)
        .bind(&s.directory_id)
        .bind(s.owner_user_id.as_deref())
        .bind(i64::from(s.seats))
        .bind(s.state.code())
        .bind(&s.created_by_user_id)
        .bind(s.create_time)
        .bind(s.cancel_time)
        .bind(request_id)
        .bind(fingerprint)
        .bind(free_trial_user)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if contract::db::is_unique_violation(&e) {
                StoreError::Conflict
            } else {
                StoreError::Backend(e)
            }
        })?;
        Ok(())
    }

    async fn by_request(
        &self,
        user_id: &str,
        request_id: &str,
    ) -> Result<Option<(Subscription, String)>, StoreError> {
        let row = sqlx::query(
            "SELECT id, offer_id, display_name, directory_id, owner_user_id, seats, state, created_by_user_id, \
             create_time, cancel_time, request_fingerprint FROM subscriptions \
             WHERE created_by_user_id = $1 AND request_id = $2",
        )
        .bind(user_id)
        .bind(request_id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some(row) => {
                let fingerprint: Option<String> = row.try_get("request_fingerprint")?;
                Ok(Some((
                    subscription_from_row(&row)?,
                    fingerprint.unwrap_or_default(),
                )))
            }
        }
    }

    async fn get(&self, id: &str) -> Result<Option<Subscription>, StoreError> {
        let row = sqlx::query(
            "SELECT id, offer_id, display_name, directory_id, owner_user_id, seats, state, created_by_user_id, \
             create_time, cancel_time FROM subscriptions WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(subscription_from_row).transpose()?)
    }

    async fn list(
        &self,
        directory_id: &str,
        owner: Option<&str>,
        after: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<Subscription>, StoreError> {
        let (after_time, after_id) = after.unwrap_or((i64::MIN, String::new()));
        let rows = sqlx::query(
            "SELECT id, offer_id, display_name, directory_id, owner_user_id, seats, state, created_by_user_id, \
             create_time, cancel_time FROM subscriptions \
             WHERE directory_id = $1 AND ($2 = '' OR owner_user_id = $2) \
             AND (create_time > $3 OR (create_time = $3 AND id > $4)) \
             ORDER BY create_time, id LIMIT $5",
        )
        .bind(directory_id)
        .bind(owner.unwrap_or(""))
        .bind(after_time)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(subscription_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn cancel(&self, id: &str, now: i64) -> Result<Option<Subscription>, StoreError> {
        let turn = self.writers.enter().await;
        sqlx::query(
            "UPDATE subscriptions SET state = $1, cancel_time = $2 WHERE id = $3 AND state = $4",
        )
        .bind(State::Cancelled.code())
        .bind(now)
        .bind(id)
        .bind(State::Active.code())
        .execute(&self.pool)
        .await?;
        drop(turn);
        self.get(id).await
    }
}
