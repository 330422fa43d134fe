-- Per-account module switches. Owned by settings-svc. One row per account,
-- every module enabled by default.
CREATE TABLE module_settings (
    account_id            BIGINT PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
    planner_enabled       BOOLEAN NOT NULL DEFAULT TRUE,
    writer_enabled        BOOLEAN NOT NULL DEFAULT TRUE,
    thinker_enabled       BOOLEAN NOT NULL DEFAULT TRUE,
    automation_enabled    BOOLEAN NOT NULL DEFAULT TRUE,
    site_builder_enabled  BOOLEAN NOT NULL DEFAULT TRUE,
    linker_enabled        BOOLEAN NOT NULL DEFAULT TRUE,
    optimizer_enabled     BOOLEAN NOT NULL DEFAULT TRUE,
    publisher_enabled     BOOLEAN NOT NULL DEFAULT TRUE,
    created_at            TIMESTAMPTZ NOT NULL,
    updated_at            TIMESTAMPTZ NOT NULL
);
