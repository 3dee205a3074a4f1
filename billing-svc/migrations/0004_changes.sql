-- The change feed's outbox (contract part two, section 2): every write that changes a
-- subscription records its change in its own transaction, so a change exists if and only if
-- its write committed. The same schema as directory-svc's (storage::feed reads both).
--
-- Cursor numbers come from the one row of change_sequence, bumped as the last statement
-- before the commit. The row's lock is held until the commit, so on PostgreSQL, with any
-- number of replicas writing, transactions commit in the order of their numbers: whoever has
-- seen a number has seen every smaller one (no gap for a reader). SQLite has one writer.
CREATE TABLE change_sequence (
    id   BIGINT PRIMARY KEY,
    last BIGINT NOT NULL
);
INSERT INTO change_sequence (id, last) VALUES (1, 0);

CREATE TABLE changes (
    seq          BIGINT PRIMARY KEY,
    -- microseconds since the epoch, by the service's clock
    change_time  BIGINT NOT NULL,
    directory_id TEXT   NOT NULL,
    -- the billing.v1.ChangeType value
    kind         BIGINT NOT NULL,
    -- the resource as it is after the change, as JSON
    resource     TEXT   NOT NULL
);

-- The retention's removal of old changes.
CREATE INDEX changes_by_time ON changes (change_time);

-- A Global or Billing Administrator's stream reads its own directory's changes in order.
CREATE INDEX changes_by_directory ON changes (directory_id, seq);
