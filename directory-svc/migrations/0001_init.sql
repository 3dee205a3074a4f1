-- Portable between SQLite and PostgreSQL: TEXT ids (UUID strings), BIGINT integers and times
-- (microseconds since the Unix epoch), no engine-only syntax.

CREATE TABLE directories (
    id             TEXT   PRIMARY KEY,
    display_name   TEXT   NOT NULL,
    -- lower-case; the unique index makes "prefix taken" race-free
    domain_prefix  TEXT   NOT NULL UNIQUE,
    initial_domain TEXT   NOT NULL,
    create_time    BIGINT NOT NULL,
    -- bumped by role-changing transactions to serialise them per directory
    lock_version   BIGINT NOT NULL
);

CREATE TABLE users (
    id            TEXT   PRIMARY KEY,
    directory_id  TEXT   NOT NULL REFERENCES directories (id),
    upn           TEXT   NOT NULL,
    -- lower-cased UPN: unique across all directories, and the list order
    upn_key       TEXT   NOT NULL UNIQUE,
    display_name  TEXT   NOT NULL,
    password_hash TEXT   NOT NULL,
    -- bit mask of roles (bit n = enum value n of directory.v1.Role)
    roles         BIGINT NOT NULL,
    create_time   BIGINT NOT NULL
);

CREATE INDEX users_by_directory ON users (directory_id, upn_key);

CREATE TABLE secrets (
    name        TEXT   PRIMARY KEY,
    secret      TEXT   NOT NULL,
    create_time BIGINT NOT NULL
);
