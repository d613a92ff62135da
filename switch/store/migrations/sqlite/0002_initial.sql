-- Schema 2, the first migratable schema of the SQLite store (schema 1 development databases
-- cannot be migrated: they kept neither reasons, digests nor full original keys).
-- Applied in one transaction by switch.store.migrations; PRAGMA user_version is the version.

CREATE TABLE accounts (
    id                TEXT PRIMARY KEY,
    currency          TEXT NOT NULL CHECK (length(currency) = 3),
    ledger_balance    INTEGER NOT NULL,
    available_balance INTEGER NOT NULL
) STRICT;

CREATE TABLE cards (
    id                     TEXT PRIMARY KEY,
    account_id             TEXT NOT NULL REFERENCES accounts(id),
    pan_fingerprint        BLOB NOT NULL UNIQUE,
    pan_ciphertext         BLOB NOT NULL,
    first6                 TEXT NOT NULL,
    last4                  TEXT NOT NULL,
    pan_length             INTEGER NOT NULL,
    expiry                 TEXT NOT NULL,
    status                 TEXT NOT NULL
        CHECK (status IN ('active', 'blocked', 'lost', 'stolen', 'closed')),
    service_code           TEXT NOT NULL,
    pan_sequence           TEXT NOT NULL,
    cvk                    TEXT,
    pvk                    TEXT,
    imk_ac                 TEXT,
    emv_cvn                TEXT,
    pin_method             TEXT CHECK (pin_method IN ('pvv', 'ibm3624')),
    pvki                   TEXT,
    pin_verification_value TEXT,
    ibm_dec_table          TEXT,
    ibm_validation_data    TEXT,
    pin_tries              INTEGER NOT NULL DEFAULT 0,
    pin_try_limit          INTEGER NOT NULL,
    last_atc               INTEGER,
    atc_seen               INTEGER NOT NULL DEFAULT 0,
    per_txn_max            INTEGER,
    daily_amount           INTEGER,
    daily_count            INTEGER,
    monthly_amount         INTEGER,
    monthly_count          INTEGER,
    blocked_mccs           TEXT NOT NULL DEFAULT '',
    blocked_countries      TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE INDEX cards_account ON cards(account_id);

-- Velocity counters of approved requests per card and period ('D'||YYYYMMDD, 'M'||YYYYMM).
CREATE TABLE velocity (
    card_id TEXT NOT NULL REFERENCES cards(id),
    period  TEXT NOT NULL,
    amount  INTEGER NOT NULL,
    count   INTEGER NOT NULL,
    PRIMARY KEY (card_id, period)
) STRICT, WITHOUT ROWID;

-- One row per request answered, keyed by its duplicate key (network, DE32, DE7, DE11, DE37,
-- DE41, MTI class) and the digest of what defines it. A request reusing a key with other
-- content is journaled as kind 'duplicate'. orig_* name the original a reversal, advice or
-- completion refers to (NULL rrn/terminal: not compared); NULL for a plain authorization.
CREATE TABLE journal (
    id                     INTEGER PRIMARY KEY,
    network                TEXT NOT NULL,
    acquirer_id            TEXT NOT NULL,
    transmission_time      TEXT NOT NULL,
    stan                   TEXT NOT NULL,
    rrn                    TEXT NOT NULL,
    terminal_id            TEXT NOT NULL,
    mti_class              TEXT NOT NULL,
    digest                 TEXT NOT NULL,
    mti                    TEXT NOT NULL,
    kind                   TEXT NOT NULL,
    orig_network           TEXT,
    orig_acquirer_id       TEXT,
    orig_transmission_time TEXT,
    orig_stan              TEXT,
    orig_mti_class         TEXT,
    orig_rrn               TEXT,
    orig_terminal_id       TEXT,
    card_id                TEXT,
    account_id             TEXT,
    masked_pan             TEXT NOT NULL,
    amount                 INTEGER NOT NULL,
    replacement_amount     INTEGER,
    currency               TEXT NOT NULL,
    reason                 TEXT NOT NULL,
    response_code          TEXT NOT NULL,
    approval_code          TEXT,
    available_balance      INTEGER,
    stand_in               INTEGER NOT NULL,
    matched                INTEGER,
    released_amount        INTEGER,
    original_journal_id    INTEGER REFERENCES journal(id),
    created_at             TEXT NOT NULL
) STRICT;
CREATE UNIQUE INDEX journal_key
    ON journal(network, acquirer_id, transmission_time, stan, rrn, terminal_id, mti_class)
    WHERE kind != 'duplicate';
CREATE UNIQUE INDEX journal_duplicate
    ON journal(network, acquirer_id, transmission_time, stan, rrn, terminal_id, mti_class,
               digest)
    WHERE kind = 'duplicate';
CREATE INDEX journal_original
    ON journal(orig_network, orig_acquirer_id, orig_transmission_time, orig_stan)
    WHERE orig_network IS NOT NULL;

-- Money an approved request moved: a hold on available funds or a posted debit; remaining
-- is what a reversal can still give back; completed_by is the completion that converted a
-- pre-authorization's hold.
CREATE TABLE holds (
    id             INTEGER PRIMARY KEY,
    journal_id     INTEGER NOT NULL UNIQUE REFERENCES journal(id),
    account_id     TEXT NOT NULL REFERENCES accounts(id),
    card_id        TEXT REFERENCES cards(id),
    kind           TEXT NOT NULL CHECK (kind IN ('hold', 'debit')),
    amount         INTEGER NOT NULL,
    remaining      INTEGER NOT NULL CHECK (remaining >= 0 AND remaining <= amount),
    velocity_day   TEXT NOT NULL,
    velocity_month TEXT NOT NULL,
    completed_by   INTEGER REFERENCES journal(id),
    created_at     TEXT NOT NULL
) STRICT;
CREATE INDEX holds_account ON holds(account_id) WHERE kind = 'hold' AND remaining > 0;

-- Reversals whose original was not found (their journal row names it); an original of the
-- same card and currency arriving later is declined and resolves the row.
CREATE TABLE unmatched_reversals (
    journal_id          INTEGER PRIMARY KEY REFERENCES journal(id),
    resolved_journal_id INTEGER REFERENCES journal(id)
) STRICT;

