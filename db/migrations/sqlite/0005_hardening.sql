-- The ledger is append-only against INSERT OR REPLACE too. REPLACE resolves
-- a uniqueness conflict by deleting the existing row, and SQLite fires the
-- delete trigger for that only when `recursive_triggers` is on, a
-- per-connection setting nobody can rely on (an operator's sqlite3 shell
-- does not set it). So the check sits on INSERT: an insert that collides
-- with an existing row on any unique column of the ledger (the id, the
-- idempotency key of its kind, the capture of a hold) is refused before
-- SQLite's conflict resolution can remove anything. The services never
-- insert a colliding row (the ledger writer looks keys up under the
-- account's lock first), so they see no difference.
--
-- A later migration that rebuilds credit_ledger must recreate this trigger.
CREATE TRIGGER credit_ledger_no_replace BEFORE INSERT ON credit_ledger
WHEN EXISTS (
    SELECT 1 FROM credit_ledger
    WHERE id = NEW.id
       OR (account_id = NEW.account_id AND kind = NEW.kind
           AND idempotency_key = NEW.idempotency_key)
       OR (NEW.hold_id IS NOT NULL AND hold_id = NEW.hold_id)
)
BEGIN
    SELECT RAISE(ABORT, 'credit_ledger is append-only: this insert collides with an existing row (INSERT OR REPLACE would delete it)');
END;
