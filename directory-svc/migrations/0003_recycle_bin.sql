-- The recycle bin: a deleted user moves here with everything it needs to come back (the same
-- id, password and roles) until its purge_time. Out of `users`, its UPN is free at once, and
-- no read of active users (by id, by UPN, lists, sign-in) sees it.

-- Moved on by every restore; a token carries the generation it was issued for.
ALTER TABLE users ADD COLUMN token_generation BIGINT NOT NULL DEFAULT 0;

CREATE TABLE deleted_users (
    id               TEXT   PRIMARY KEY,
    directory_id     TEXT   NOT NULL REFERENCES directories (id),
    upn              TEXT   NOT NULL,
    -- not unique here: a UPN may be deleted, taken, and deleted again
    upn_key          TEXT   NOT NULL,
    display_name     TEXT   NOT NULL,
    password_hash    TEXT   NOT NULL,
    roles            BIGINT NOT NULL,
    create_time      BIGINT NOT NULL,
    token_generation BIGINT NOT NULL,
    delete_time      BIGINT NOT NULL,
    purge_time       BIGINT NOT NULL
);

-- ListDeletedUsers' order within a directory; the purge's scan by time.
CREATE INDEX deleted_users_by_directory ON deleted_users (directory_id, upn_key, id);
CREATE INDEX deleted_users_by_purge_time ON deleted_users (purge_time);
