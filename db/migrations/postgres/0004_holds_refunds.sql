-- Holds and refunds. A hold reserves credits without moving the balance;
-- `accounts.held` is the sum of the account's holds in state `active`
-- (expired holds are swept out of it by the next ledger write of the
-- account, under its row lock). The database keeps balance >= held >= 0.
ALTER TABLE accounts ADD COLUMN held BIGINT NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD CONSTRAINT accounts_held_within_balance CHECK (held >= 0 AND held <= credits);

-- Two more kinds of ledger row: CAPTURE (a hold charged, negative) and
-- REFUND (part of an earlier charge given back, positive).
ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_kind_known;
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_kind_known
    CHECK (kind IN ('deduct', 'grant', 'capture', 'refund'));
ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_sign;
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_sign CHECK (
    (kind IN ('deduct', 'capture') AND credits < 0) OR (kind IN ('grant', 'refund') AND credits > 0)
);
ALTER TABLE credit_ledger ADD COLUMN hold_id TEXT NULL;
ALTER TABLE credit_ledger ADD COLUMN refund_of BIGINT NULL REFERENCES credit_ledger (id);
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_links CHECK (
    (kind = 'capture') = (hold_id IS NOT NULL) AND (kind = 'refund') = (refund_of IS NOT NULL)
);
-- Idempotency keys are a namespace per account and per kind of request.
ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_idempotency;
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_idempotency UNIQUE (account_id, kind, idempotency_key);
CREATE UNIQUE INDEX credit_ledger_one_capture_per_hold ON credit_ledger (hold_id) WHERE hold_id IS NOT NULL;
CREATE INDEX credit_ledger_refunds_idx ON credit_ledger (refund_of) WHERE refund_of IS NOT NULL;

-- The refunds of a row never exceed what it charged, and only charges of the
-- same account can be refunded.
CREATE FUNCTION credit_ledger_refund_bound() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    charged  BIGINT;
    refunded BIGINT;
BEGIN
    IF NEW.kind <> 'refund' THEN
        RETURN NEW;
    END IF;
    SELECT -credits INTO charged FROM credit_ledger
        WHERE id = NEW.refund_of AND account_id = NEW.account_id AND kind IN ('deduct', 'capture');
    IF charged IS NULL THEN
        RAISE EXCEPTION 'refund_of % is not a charge of account %', NEW.refund_of, NEW.account_id
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT COALESCE(SUM(credits), 0) INTO refunded FROM credit_ledger WHERE refund_of = NEW.refund_of;
    IF refunded + NEW.credits > charged THEN
        RAISE EXCEPTION 'refunds of row % would exceed its charge of %', NEW.refund_of, charged
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER credit_ledger_refund_bound
    BEFORE INSERT ON credit_ledger
    FOR EACH ROW EXECUTE FUNCTION credit_ledger_refund_bound();

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
    created_at        TIMESTAMPTZ NOT NULL,
    expires_at_us     BIGINT NOT NULL,
    closed_at         TIMESTAMPTZ NULL,
    transaction_id    BIGINT NULL REFERENCES credit_ledger (id),
    CONSTRAINT credit_holds_captured_within CHECK (captured_credits >= 0 AND captured_credits <= credits),
    CONSTRAINT credit_holds_capture_link CHECK ((state = 'captured') = (transaction_id IS NOT NULL)),
    CONSTRAINT credit_holds_idempotency UNIQUE (account_id, idempotency_key)
);

CREATE INDEX credit_holds_active_idx ON credit_holds (account_id, expires_at_us) WHERE state = 'active';
