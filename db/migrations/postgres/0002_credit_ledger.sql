-- The credit ledger: one append-only row per change of balance. Owned by
-- billing-svc. Idempotency keys live on the rows themselves, so they are kept
-- as long as the ledger (well beyond the 7 days the contract asks for).
CREATE TABLE credit_ledger (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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
    created_at       TIMESTAMPTZ NOT NULL,
    CONSTRAINT credit_ledger_sign CHECK (
        (kind = 'deduct' AND credits < 0) OR (kind = 'grant' AND credits > 0)
    ),
    CONSTRAINT credit_ledger_idempotency UNIQUE (account_id, idempotency_key)
);

CREATE INDEX credit_ledger_account_newest_idx ON credit_ledger (account_id, id DESC);

CREATE FUNCTION credit_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credit_ledger is append-only: % is not allowed', TG_OP;
END;
$$;

CREATE TRIGGER credit_ledger_append_only
    BEFORE UPDATE OR DELETE ON credit_ledger
    FOR EACH ROW EXECUTE FUNCTION credit_ledger_append_only();
