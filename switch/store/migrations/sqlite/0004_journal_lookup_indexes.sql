-- The duplicate-key lookup reads every row of a key (its own and those journaled as
-- duplicate transmissions): the partial unique indexes cannot serve it, this one does, and
-- it serves the original lookup of reversals and advices by its prefix. Operators search the
-- journal by STAN, RRN and time.
CREATE INDEX journal_lookup
    ON journal(network, acquirer_id, transmission_time, stan, rrn, terminal_id, mti_class);
CREATE INDEX journal_stan ON journal(stan);
CREATE INDEX journal_rrn ON journal(rrn);
CREATE INDEX journal_created ON journal(created_at);
