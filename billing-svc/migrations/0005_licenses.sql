-- Licences (contract part two, section 3): the seats of an Office 365 offer in one directory
-- form one pool; assigning a licence to a user takes a seat of it.

-- One row per directory and offer, created by the directory's first purchase of the offer.
-- `enabled`: the seats of its active subscriptions; `consumed`: its assignments. The CHECK is
-- the invariant itself, held by the database whatever the writer: no statement can leave a
-- pool with more licences assigned than seats.
CREATE TABLE license_pools (
    directory_id TEXT   NOT NULL,
    offer_id     TEXT   NOT NULL,
    enabled      BIGINT NOT NULL,
    consumed     BIGINT NOT NULL,
    PRIMARY KEY (directory_id, offer_id),
    CHECK (consumed >= 0 AND consumed <= enabled)
);

-- The pools of the subscriptions bought before licences existed (only per-seat offers, all of
-- Office 365, have seats).
INSERT INTO license_pools (directory_id, offer_id, enabled, consumed)
SELECT directory_id, offer_id, SUM(seats), 0 FROM subscriptions
WHERE state = 1 AND seats > 0
GROUP BY directory_id, offer_id;

-- The key is ListLicenseAssignments' order within a directory (user, then offer); a list
-- filtered by offer reads it too, skipping the other offers' rows. No index by offer: it cost
-- assignments a sixth of their throughput on SQLite (docs/decisions/licence-batches.md).
CREATE TABLE license_assignments (
    directory_id TEXT   NOT NULL,
    user_id      TEXT   NOT NULL,
    offer_id     TEXT   NOT NULL,
    -- microseconds since the epoch
    assign_time  BIGINT NOT NULL,
    PRIMARY KEY (directory_id, user_id, offer_id)
);


-- The assignments of users billing has seen deleted: neither counted nor listed, until the
-- user is restored (each given back while its pool has a free seat) or purged.
CREATE TABLE licenses_set_aside (
    directory_id TEXT   NOT NULL,
    user_id      TEXT   NOT NULL,
    offer_id     TEXT   NOT NULL,
    assign_time  BIGINT NOT NULL,
    PRIMARY KEY (user_id, offer_id)
);

-- Users billing has seen deleted (by the directory's change feed) and not restored since.
-- The follower writes the mark, then locks the directory's pools, then sets the user's
-- assignments aside; an assignment locks its pool (taking its seat), then looks for the mark.
-- So whichever comes second sees the other: an assignment racing a deletion cannot outlive
-- it, and the assignment's hot path writes no row per user.
CREATE TABLE deleted_license_users (
    user_id      TEXT PRIMARY KEY,
    directory_id TEXT NOT NULL
);

-- Where billing is in the directory's change feed: the cursor moves in the transaction of
-- each change's effects, compared with the one it moves from, so an effect is applied exactly
-- once, however many replicas try.
CREATE TABLE directory_follower (
    id     BIGINT PRIMARY KEY,
    -- the directory's cursor of the last change applied ('': start at the oldest kept)
    last_cursor TEXT NOT NULL
);
INSERT INTO directory_follower (id, last_cursor) VALUES (1, '');

-- Named leases (storage::lease): which replica follows the directory's feed.
CREATE TABLE leases (
    name   TEXT   PRIMARY KEY,
    holder TEXT   NOT NULL,
    -- microseconds since the epoch, by the database's clock
    expires_at BIGINT NOT NULL
);
