//! Named leases in the service's own database: at most one process holds a lease at a time,
//! for as long as it renews it, and another takes it over once it has run out (its holder
//! died or lost the database). Times are the database's clock, so replicas on machines whose
//! clocks disagree still agree on who holds it.
//!
//! A lease makes one replica do a job (follow a feed, record a timed change) instead of all
//! of them; it is not what keeps the job's effects exactly once. Between a holder's last
//! renewal and the moment it notices the lease ran out, another may have taken over, so a job
//! guarded by a lease must also make each effect conditional in the database (a cursor
//! compared and moved in the effect's transaction, say).
//!
//! The service's migrations create the table:
//! `CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at BIGINT NOT NULL)`.

use std::time::Duration;

use sqlx::{AnyPool, AssertSqlSafe};

use crate::db::Engine;

/// The database's time now, in microseconds since the Unix epoch.
fn now_sql(engine: Engine) -> &'static str {
    match engine {
        Engine::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS BIGINT)",
        Engine::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)",
    }
}

/// One named lease, held (or wanted) by this process as `holder`.
#[derive(Debug, Clone)]
pub struct Lease {
    pool: AnyPool,
    name: String,
    holder: String,
    take: String,
}

impl Lease {
    /// The lease `name` of the database behind `pool`, for this process (a new holder id).
    pub fn new(pool: AnyPool, engine: Engine, name: impl Into<String>) -> Self {
        let now = now_sql(engine);
        Self {
            pool,
            name: name.into(),
            holder: uuid::Uuid::new_v4().to_string(),
            // Taken when free or run out, renewed when ours; otherwise left as it is.
            take: format!(
                "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, {now} + $3) \
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
                 WHERE leases.holder = excluded.holder OR leases.expires_at < {now}"
            ),
        }
    }

    /// Who this process is, as the lease's holder.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Takes or renews the lease for `ttl`: whether this process holds it now.
    pub async fn hold(&self, ttl: Duration) -> Result<bool, sqlx::Error> {
        let ttl = i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX);
        let taken = sqlx::query(AssertSqlSafe(self.take.as_str()))
            .bind(&self.name)
            .bind(&self.holder)
            .bind(ttl)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(taken == 1)
    }

    /// Gives the lease up (if held), so another may take it at once.
    pub async fn release(&self) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(&self.name)
            .bind(&self.holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sqlite_pool() -> (AnyPool, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("lease-{}", uuid::Uuid::new_v4()));
        let url = format!("sqlite://{}/l.db", dir.display());
        let pool = crate::db::connect(&url, &crate::db::PoolSettings::default())
            .await
            .expect("opens");
        sqlx::query(
            "CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at BIGINT NOT NULL)",
        )
        .execute(&pool)
        .await
        .expect("creates");
        (pool, dir)
    }

    /// One holder at a time: the other gets it once it runs out or is released.
    #[tokio::test]
    async fn one_holder_until_it_runs_out_or_lets_go() {
        let (pool, dir) = sqlite_pool().await;
        let a = Lease::new(pool.clone(), Engine::Sqlite, "job");
        let b = Lease::new(pool.clone(), Engine::Sqlite, "job");
        let other = Lease::new(pool.clone(), Engine::Sqlite, "another job");
        assert!(a.hold(Duration::from_secs(60)).await.expect("a"));
        assert!(!b.hold(Duration::from_secs(60)).await.expect("b"));
        assert!(other.hold(Duration::from_secs(60)).await.expect("other"));
        assert!(a.hold(Duration::from_millis(1)).await.expect("a renews"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(b.hold(Duration::from_secs(60)).await.expect("b takes over"));
        assert!(!a.hold(Duration::from_secs(60)).await.expect("a lost it"));
        b.release().await.expect("b lets go");
        assert!(a.hold(Duration::from_secs(60)).await.expect("a again"));
        pool.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
