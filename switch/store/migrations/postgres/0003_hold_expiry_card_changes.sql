-- Schema 3: hold expiry (when a hold lapses, and who released it when) and the journal of
-- card changes by operators and provisioning files.

ALTER TABLE holds ADD COLUMN expires_at TEXT;
ALTER TABLE holds ADD COLUMN released_at TEXT;
ALTER TABLE holds ADD COLUMN released_by TEXT;
CREATE INDEX holds_expiry ON holds(expires_at) WHERE kind = 'hold' AND remaining > 0;

-- Every change of a card by an operator or a provisioning file: who, when, what (a JSON
-- object attribute -> [old, new], secrets only named).
CREATE TABLE card_changes (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    card_id    TEXT NOT NULL REFERENCES cards(id),
    masked_pan TEXT NOT NULL,
    actor      TEXT NOT NULL,
    at         TEXT NOT NULL,
    changed    TEXT NOT NULL
);
CREATE INDEX card_changes_card ON card_changes(card_id);
