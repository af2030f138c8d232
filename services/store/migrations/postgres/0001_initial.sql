-- Switchboard's PostgreSQL schema, version 1. Identifiers are compared
-- bytewise (COLLATE "C"), as the embedded engine orders them; message ids
-- are bytea (text cannot hold every string a client may send).

-- Inboxes: one row per undelivered message, keyed (app, user, seq). A
-- follow-up (a sender confirmation) carries the id it is keyed by in its
-- inbox, so that writing it twice stores it once.
CREATE TABLE inbox (
    app        text COLLATE "C" NOT NULL,
    user_id    text COLLATE "C" NOT NULL,
    seq        bigint NOT NULL,
    has_ref    boolean NOT NULL,
    follow_key bytea,
    body       bytea NOT NULL,
    PRIMARY KEY (app, user_id, seq)
);
CREATE UNIQUE INDEX inbox_follow_ups ON inbox (app, user_id, follow_key)
    WHERE follow_key IS NOT NULL;

-- The last sequence number given per inbox: updated in the transaction
-- that inserts the messages, so appends to one inbox commit in seq order.
CREATE TABLE inbox_counters (
    app      text COLLATE "C" NOT NULL,
    user_id  text COLLATE "C" NOT NULL,
    last_seq bigint NOT NULL,
    PRIMARY KEY (app, user_id)
);

-- Client-given message ids accepted per sender, for the id window.
CREATE TABLE id_index (
    app         text COLLATE "C" NOT NULL,
    sender      text COLLATE "C" NOT NULL,
    client_id   bytea NOT NULL,
    accepted_at timestamptz NOT NULL,
    PRIMARY KEY (app, sender, client_id)
);
CREATE INDEX id_index_by_age ON id_index (accepted_at);

-- Durable queues (outboxes). A lease names the database session of its
-- taker (pid and start time): it ends when it runs out or that session does.
CREATE TABLE queue_counters (
    queue   text COLLATE "C" PRIMARY KEY,
    last_id bigint NOT NULL
);
CREATE TABLE queue_items (
    queue          text COLLATE "C" NOT NULL,
    id             bigint NOT NULL,
    enqueued_at_ms bigint NOT NULL,
    attempts       integer NOT NULL DEFAULT 0,
    lease_until    timestamptz,
    lease_pid      integer,
    lease_start    timestamptz,
    payload        bytea NOT NULL,
    PRIMARY KEY (queue, id)
);

-- Persistent groups and their members.
CREATE TABLE groups (
    app        text COLLATE "C" NOT NULL,
    grp        text COLLATE "C" NOT NULL,
    name       text NOT NULL,
    owner      text COLLATE "C" NOT NULL,
    created_ms bigint NOT NULL,
    PRIMARY KEY (app, grp)
);
CREATE TABLE group_members (
    app     text COLLATE "C" NOT NULL,
    grp     text COLLATE "C" NOT NULL,
    user_id text COLLATE "C" NOT NULL,
    PRIMARY KEY (app, grp, user_id),
    FOREIGN KEY (app, grp) REFERENCES groups (app, grp) ON DELETE CASCADE
);
CREATE INDEX group_members_by_user ON group_members (app, user_id, grp);
