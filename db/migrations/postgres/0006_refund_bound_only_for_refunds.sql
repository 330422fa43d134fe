-- The refund bound (0004) only concerns refunds; its function returns at once
-- for every other kind. Firing it only for refunds spares every deduct,
-- grant and capture a PL/pgSQL call per inserted row (the SQLite trigger
-- already has this WHEN). Same rule, same function: dropped and re-created
-- in this migration's one transaction, so no insert ever runs without it.
DROP TRIGGER credit_ledger_refund_bound ON credit_ledger;
CREATE TRIGGER credit_ledger_refund_bound
    BEFORE INSERT ON credit_ledger
    FOR EACH ROW WHEN (NEW.kind = 'refund')
    EXECUTE FUNCTION credit_ledger_refund_bound();
