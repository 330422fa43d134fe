-- Holds and refunds; see the PostgreSQL migration of the same number. SQLite
-- cannot drop or change table constraints, so the ledger is rebuilt with its
-- new constraints (its triggers are recreated below).
ALTER TABLE accounts ADD COLUMN held BIGINT NOT NULL DEFAULT 0
    CONSTRAINT accounts_held_within_balance CHECK (held >= 0 AND held <= credits);

CREATE TABLE credit_ledger_v4 (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id       BIGINT NOT NULL REFERENCES accounts (id),
    kind             TEXT NOT NULL CONSTRAINT credit_ledger_kind_known
                     CHECK (kind IN ('deduct', 'grant', 'capture', 'refund')),
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
    hold_id          TEXT NULL,
    refund_of        BIGINT NULL REFERENCES credit_ledger_v4 (id),
    CONSTRAINT credit_ledger_sign CHECK (
        (kind IN ('deduct', 'capture') AND credits < 0) OR (kind IN ('grant', 'refund') AND credits > 0)
    ),
    CONSTRAINT credit_ledger_links CHECK (
        (kind = 'capture') = (hold_id IS NOT NULL) AND (kind = 'refund') = (refund_of IS NOT NULL)
    ),
    CONSTRAINT credit_ledger_idempotency UNIQUE (account_id, kind, idempotency_key)
);

INSERT INTO credit_ledger_v4 (id, account_id, kind, credits, balance_after, operation, quantity,
    description, metadata, idempotency_key, request_hash, actor, created_at)
SELECT id, account_id, kind, credits, balance_after, operation, quantity,
    description, metadata, idempotency_key, request_hash, actor, created_at
FROM credit_ledger;

DROP TABLE credit_ledger;
ALTER TABLE credit_ledger_v4 RENAME TO credit_ledger;

CREATE INDEX credit_ledger_account_newest_idx ON credit_ledger (account_id, id DESC);
CREATE UNIQUE INDEX credit_ledger_one_capture_per_hold ON credit_ledger (hold_id) WHERE hold_id IS NOT NULL;
CREATE INDEX credit_ledger_refunds_idx ON credit_ledger (refund_of) WHERE refund_of IS NOT NULL;

CREATE TRIGGER credit_ledger_no_update BEFORE UPDATE ON credit_ledger
BEGIN
    SELECT RAISE(ABORT, 'credit_ledger is append-only: UPDATE is not allowed');
END;

CREATE TRIGGER credit_ledger_no_delete BEFORE DELETE ON credit_ledger
BEGIN
    SELECT RAISE(ABORT, 'credit_ledger is append-only: DELETE is not allowed');
END;

-- The refunds of a row never exceed what it charged, and only charges of the
-- same account can be refunded.
CREATE TRIGGER credit_ledger_refund_bound BEFORE INSERT ON credit_ledger
WHEN NEW.kind = 'refund'
BEGIN
    SELECT RAISE(ABORT, 'refund_of is not a charge of this account')
    WHERE NOT EXISTS (SELECT 1 FROM credit_ledger WHERE id = NEW.refund_of
                      AND account_id = NEW.account_id AND kind IN ('deduct', 'capture'));
    SELECT RAISE(ABORT, 'refunds would exceed the charge')
    WHERE (SELECT -credits FROM credit_ledger WHERE id = NEW.refund_of)
        < COALESCE((SELECT SUM(credits) FROM credit_ledger WHERE refund_of = NEW.refund_of), 0) + NEW.credits;
END;

-- expires_at_us: microseconds since the Unix epoch (UTC), the same integer on
-- both backends, so "expired" is one comparison everywhere.
CREATE TABLE credit_holds (
    id                TEXT PRIMARY KEY,
    account_id        BIGINT NOT NULL REFERENCES accounts (id),
    state             TEXT NOT NULL CONSTRAINT credit_holds_state_known
                      CHECK (state IN ('active', 'captured', 'released', 'expired')),
    credits           BIGINT NOT NULL CONSTRAINT credit_holds_positive CHECK (credits > 0),
    captured_credits  BIGINT NOT NULL DEFAULT 0,
    operation         TEXT NOT NULL DEFAULT '',
    quantity          BIGINT NOT NULL DEFAULT 0 CHECK (quantity >= 0),
    description       TEXT NOT NULL DEFAULT '',
    metadata          TEXT NOT NULL DEFAULT '{}',
    idempotency_key   TEXT NOT NULL,
    request_hash      TEXT NOT NULL,
    actor             TEXT NOT NULL,
    created_at        TEXT NOT NULL,
    expires_at_us     BIGINT NOT NULL,
    closed_at         TEXT NULL,
    transaction_id    BIGINT NULL REFERENCES credit_ledger (id),
    CONSTRAINT credit_holds_captured_within CHECK (captured_credits >= 0 AND captured_credits <= credits),
    CONSTRAINT credit_holds_capture_link CHECK ((state = 'captured') = (transaction_id IS NOT NULL)),
    CONSTRAINT credit_holds_idempotency UNIQUE (account_id, idempotency_key)
);

CREATE INDEX credit_holds_active_idx ON credit_holds (account_id, expires_at_us) WHERE state = 'active';
