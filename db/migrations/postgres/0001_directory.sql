-- Directory tables: a contract with the platform that owns users. The platform
-- writes them; the services read them (billing also moves accounts.credits).
CREATE TABLE IF NOT EXISTS accounts (
    id          BIGINT PRIMARY KEY,
    name        TEXT NOT NULL DEFAULT '',
    status      TEXT NOT NULL DEFAULT 'active'
                CONSTRAINT accounts_status_known CHECK (status IN ('active', 'suspended')),
    -- The last line of defence for "a balance never goes below zero".
    credits     BIGINT NOT NULL DEFAULT 0
                CONSTRAINT accounts_credits_non_negative CHECK (credits >= 0),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS users (
    id          BIGINT PRIMARY KEY,
    account_id  BIGINT NULL REFERENCES accounts (id) ON DELETE SET NULL,
    -- owner, admin, editor, viewer or developer. Deliberately not a CHECK:
    -- the platform owns this table; a role the services do not know is
    -- refused at call time (fail closed) instead of breaking its writes.
    role        TEXT NOT NULL,
    is_active   BOOLEAN NOT NULL DEFAULT TRUE,
    email       TEXT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS users_account_id_idx ON users (account_id);
