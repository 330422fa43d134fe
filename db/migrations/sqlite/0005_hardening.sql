-- The ledger is append-only against INSERT OR REPLACE too. REPLACE resolves
-- a conflict by deleting the existing row, and SQLite fires the delete
-- trigger (0002) for that only when `recursive_triggers` is on, which is a
-- per-connection setting nobody can rely on. So the check sits on INSERT:
--
-- * an insert naming an existing row id is refused outright (the services
--   never choose ids);
-- * an insert whose (account_id, idempotency_key) is already taken is
--   skipped, row left as it was. That is exactly what the services' own
--   `ON CONFLICT (account_id, idempotency_key) DO NOTHING` asks for, so they
--   see no difference, while `INSERT OR REPLACE` can no longer remove or
--   rewrite a ledger row.
CREATE TRIGGER credit_ledger_no_replace_id BEFORE INSERT ON credit_ledger
WHEN EXISTS (SELECT 1 FROM credit_ledger WHERE id = NEW.id)
BEGIN
    SELECT RAISE(ABORT, 'credit_ledger is append-only: a row with this id exists');
END;

CREATE TRIGGER credit_ledger_no_replace_key BEFORE INSERT ON credit_ledger
WHEN EXISTS (
    SELECT 1 FROM credit_ledger
    WHERE account_id = NEW.account_id AND idempotency_key = NEW.idempotency_key
)
BEGIN
    SELECT RAISE(IGNORE);
END;
