-- Indexes only the rows they serve, so a purchase writes fewer index pages:
-- * the owner index only Azure subscriptions (Office 365 ones are owned by the directory, and
--   their owner is NULL), and a user's own list now reads it (it was never read before);
-- * one free trial per user: a partial unique index on the free-trial rows in place of the
--   column's UNIQUE constraint, which indexed every subscription. Both engines drop a column
--   constraint only by rebuilding the table, so it is rebuilt, rows and ids unchanged.

CREATE TABLE subscriptions_sparse (
    id                  TEXT   PRIMARY KEY,
    offer_id            TEXT   NOT NULL,
    display_name        TEXT   NOT NULL,
    directory_id        TEXT   NOT NULL,
    -- the owning user (Azure); NULL when the directory owns it (Office 365)
    owner_user_id       TEXT,
    seats               BIGINT NOT NULL,
    -- 1 active, 2 cancelled (billing.v1.SubscriptionState)
    state               BIGINT NOT NULL,
    created_by_user_id  TEXT   NOT NULL,
    create_time         BIGINT NOT NULL,
    cancel_time         BIGINT,
    -- the caller's request_id (NULL when none) and what the request asked for
    request_id          TEXT,
    request_fingerprint TEXT,
    -- the creator, for free-trial subscriptions only (NULL otherwise): one free trial per user
    free_trial_user_id  TEXT
);

INSERT INTO subscriptions_sparse (id, offer_id, display_name, directory_id, owner_user_id, seats,
    state, created_by_user_id, create_time, cancel_time, request_id, request_fingerprint,
    free_trial_user_id)
SELECT id, offer_id, display_name, directory_id, owner_user_id, seats, state, created_by_user_id,
    create_time, cancel_time, request_id, request_fingerprint, free_trial_user_id
FROM subscriptions;

DROP TABLE subscriptions;
ALTER TABLE subscriptions_sparse RENAME TO subscriptions;

-- one subscription per (user, request_id): retries can never create a second one
CREATE UNIQUE INDEX subscriptions_by_request ON subscriptions (created_by_user_id, request_id);
CREATE INDEX subscriptions_by_directory ON subscriptions (directory_id, create_time, id);
CREATE INDEX subscriptions_by_owner ON subscriptions (owner_user_id, create_time, id)
    WHERE owner_user_id IS NOT NULL;
CREATE UNIQUE INDEX subscriptions_one_free_trial ON subscriptions (free_trial_user_id)
    WHERE free_trial_user_id IS NOT NULL;
