-- The audit log (R11, R17). Append-only: the service has no statement that
-- updates or deletes an entry. Per tenant, entries are numbered from 0 (the
-- Merkle leaf index); event bytes are kept exactly as appended (hex), so
-- their leaf hashes can be recomputed by anyone holding an export.

CREATE TABLE audit_entries (
    tenant_id        TEXT   NOT NULL,
    idx              BIGINT NOT NULL,
    event_id         TEXT   NOT NULL,
    event_hex        TEXT   NOT NULL,
    leaf_hash        TEXT   NOT NULL,
    chain_hash       TEXT   NOT NULL,
    estate_id        TEXT   NOT NULL,
    person_pseudonym TEXT   NOT NULL,
    action           TEXT   NOT NULL,
    occurred_at      BIGINT NOT NULL,
    appended_at      BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, idx)
);
CREATE UNIQUE INDEX audit_entries_event ON audit_entries (tenant_id, event_id);
CREATE INDEX audit_entries_person ON audit_entries (tenant_id, person_pseudonym, idx);
CREATE INDEX audit_entries_estate ON audit_entries (tenant_id, estate_id, idx);

CREATE TABLE audit_checkpoints (
    tenant_id      TEXT   NOT NULL,
    tree_size      BIGINT NOT NULL,
    root_hash      TEXT   NOT NULL,
    chain_hash     TEXT   NOT NULL,
    timestamp_unix BIGINT NOT NULL,
    key_id         TEXT   NOT NULL,
    checkpoint_hex TEXT   NOT NULL,
    signature_hex  TEXT   NOT NULL,
    PRIMARY KEY (tenant_id, tree_size)
);
