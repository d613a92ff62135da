-- Operators search the journal by STAN, RRN and time (the duplicate-key and original
-- lookups already have journal_original_key).
CREATE INDEX journal_stan ON journal(stan);
CREATE INDEX journal_rrn ON journal(rrn);
CREATE INDEX journal_created ON journal(created_at);
