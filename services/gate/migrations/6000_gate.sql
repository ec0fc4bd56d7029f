-- Gate service (R15). Portable SQL for SQLite and PostgreSQL.

-- Per-gate rules set by operators; a gate without a row has the defaults.
CREATE TABLE gate_rules (
    tenant_id          TEXT   NOT NULL,
    gate_id            TEXT   NOT NULL,
    estate_id          TEXT   NOT NULL,
    anti_passback      BIGINT NOT NULL,
    windows            TEXT   NOT NULL,
    bundle_ttl_secs    BIGINT NOT NULL,
    utc_offset_minutes BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, gate_id)
);

-- What the mesh knows of each gate: when it was last heard from and which
-- offline bundle it was given and acknowledged.
CREATE TABLE gate_status (
    tenant_id             TEXT   NOT NULL,
    gate_id               TEXT   NOT NULL,
    estate_id             TEXT   NOT NULL,
    last_seen_at          BIGINT,
    bundle_version_issued BIGINT NOT NULL,
    bundle_version_acked  BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, gate_id)
);

-- Bundles issued, with the credentials they hold, so that an operator can
-- see which gates still hold a credential revoked since. Old versions that
-- are neither the latest nor the acknowledged one are pruned.
CREATE TABLE gate_bundles (
    tenant_id      TEXT   NOT NULL,
    gate_id        TEXT   NOT NULL,
    version        BIGINT NOT NULL,
    estate_id      TEXT   NOT NULL,
    issued_at      BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    credential_ids TEXT   NOT NULL,
    PRIMARY KEY (tenant_id, gate_id, version)
);

-- Decisions a gate made offline, once each: the key makes uploads
-- idempotent per (gate, sequence).
CREATE TABLE gate_offline_decisions (
    tenant_id   TEXT   NOT NULL,
    gate_id     TEXT   NOT NULL,
    sequence    BIGINT NOT NULL,
    decision_id TEXT   NOT NULL,
    decided_at  BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, gate_id, sequence)
);
