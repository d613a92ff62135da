-- Schema 6: whether the answer of a journaled request reached its peer. NULL: handed to the
-- transport (sent); 'undelivered': the connection could not write it (the write failed, the
-- connection closed or its deadline passed first), delivery_reason says how (the
-- cardswitch_answers_undelivered kind) and delivery_at when it was marked (ISO 8601 UTC).
-- Reconciliation lists them (cardswitch journal search --undelivered); the partial index
-- keeps that cheap and costs nothing on the commit path (every new row is NULL there).
ALTER TABLE journal ADD COLUMN delivery TEXT;
ALTER TABLE journal ADD COLUMN delivery_reason TEXT;
ALTER TABLE journal ADD COLUMN delivery_at TEXT;
CREATE INDEX journal_undelivered ON journal(id) WHERE delivery IS NOT NULL;
