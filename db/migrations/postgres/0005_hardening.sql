-- The ledger is append-only against TRUNCATE too: row triggers (0002) do not
-- fire for TRUNCATE, which empties a table without deleting rows one by one.
-- Also blocks `TRUNCATE credit_ledger CASCADE` and `TRUNCATE accounts CASCADE`
-- (a plain TRUNCATE is already stopped by the refunds' self-reference).
CREATE TRIGGER credit_ledger_no_truncate
    BEFORE TRUNCATE ON credit_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION credit_ledger_append_only();
