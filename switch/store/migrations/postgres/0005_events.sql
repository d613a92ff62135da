-- Schema 5: the transactional outbox of authorization events (switch.events, switch.relay).
-- Events for the rest of the platform, written in the transaction of the decision they
-- describe (switch.events builds the payload; it holds no card data). group_key is the SQS
-- message group (account, else card, else 'none'). id orders the rows of one group in commit
-- order: every decision of an account inserts its row while holding the account's row lock.
-- published_at is set once SQS acknowledged the row; parked_at once it was rejected as
-- invalid or failed too often (kept, counted, never blocking other rows).
-- Indexes are few on purpose (each costs every decision's commit): event_id is a UUID 4
-- (unique by construction, looked up by consumers, never here), and replay's scan by
-- created_at runs rarely, from the operator's command.
CREATE TABLE events (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     TEXT NOT NULL,
    type         TEXT NOT NULL,
    group_key    TEXT NOT NULL,
    journal_id   BIGINT REFERENCES journal(id),
    created_at   TEXT NOT NULL,
    payload      TEXT NOT NULL,
    published_at TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    parked_at    TEXT
);
CREATE INDEX events_pending ON events(id) WHERE published_at IS NULL AND parked_at IS NULL;
CREATE INDEX events_parked ON events(id) WHERE parked_at IS NOT NULL;
CREATE INDEX events_published ON events(published_at) WHERE published_at IS NOT NULL;

-- Who runs the relay of this database: one owner at a time, renewed before expires_at (Unix
-- seconds), taken over by another instance once expired. Claimed with SELECT ... FOR UPDATE
-- SKIP LOCKED: a contender skips a row being renewed instead of waiting behind it.
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
