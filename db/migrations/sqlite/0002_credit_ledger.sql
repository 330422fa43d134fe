-- The credit ledger: one append-only row per change of balance. Owned by
-- billing-svc. Idempotency keys live on the rows themselves, so they are kept
-- as long as the ledger (well beyond the 7 days the contract asks for).
CREATE TABLE credit_ledger (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id       BIGINT NOT NULL REFERENCES accounts (id),
    kind             TEXT NOT NULL CONSTRAINT credit_ledger_kind_known CHECK (kind IN ('deduct', 'grant')),
    credits          BIGINT NOT NULL,
    balance_after    BIGINT NOT NULL CONSTRAINT credit_ledger_balance_non_negative CHECK (balance_after >= 0),
    operation        TEXT NOT NULL DEFAULT '',
    quantity         BIGINT NOT NULL DEFAULT 0 CHECK (quantity >= 0),
    description      TEXT NOT NULL DEFAULT '',
    metadata         TEXT NOT NULL DEFAULT '{}',
    idempotency_key  TEXT NOT NULL,
    request_hash     TEXT NOT NULL,
    actor            TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    CONSTRAINT credit_ledger_sign CHECK (
        (kind = 'deduct' AND credits < 0) OR (kind = 'grant' AND credits > 0)
    ),
    CONSTRAINT credit_ledger_idempotency UNIQUE (account_id, idempotency_key)
);

CREATE INDEX credit_ledger_account_newest_idx ON credit_ledger (account_id, id DESC);

CREATE TRIGGER credit_ledger_no_update BEFORE UPDATE ON credit_ledger
BEGIN
    SELECT RAISE(ABORT, 'credit_ledger is append-only: UPDATE is not allowed');
END;

CREATE TRIGGER credit_ledger_no_delete BEFORE DELETE ON credit_ledger
BEGIN
    SELECT RAISE(ABORT, 'credit_ledger is append-only: DELETE is not allowed');
END;
