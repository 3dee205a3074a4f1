-- Replicas that keep an in-memory cache of this database while they hold a lease (see the
-- contract crate's `peers` module). Used on PostgreSQL only; harmless on SQLite.
CREATE TABLE cache_holders (
    holder TEXT PRIMARY KEY,
    -- Microseconds since the epoch, by the database's clock.
    expires_at BIGINT NOT NULL
);
