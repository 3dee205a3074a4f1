-- Portable between SQLite and PostgreSQL: TEXT ids (UUID strings), BIGINT integers and times
-- (microseconds since the Unix epoch), no engine-only syntax.

CREATE TABLE subscriptions (
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
    -- the creator, for free-trial subscriptions only: one free trial per user
    free_trial_user_id  TEXT   UNIQUE
);

-- one subscription per (user, request_id): retries can never create a second one
CREATE UNIQUE INDEX subscriptions_by_request ON subscriptions (created_by_user_id, request_id);
CREATE INDEX subscriptions_by_directory ON subscriptions (directory_id, create_time, id);
CREATE INDEX subscriptions_by_owner ON subscriptions (owner_user_id, create_time, id);

CREATE TABLE secrets (
    name        TEXT   PRIMARY KEY,
    secret      TEXT   NOT NULL,
    create_time BIGINT NOT NULL
);
