-- Credentials (R1, R2, R4, R15). Portable SQL for SQLite and PostgreSQL.
-- Secrets are never stored in clear: cards and visitor codes as keyed hashes
-- (lookup_hash), PINs as argon2id hashes, QR seeds sealed with AES-256-GCM
-- (sealed_secret, hex).

CREATE TABLE credentials (
    tenant_id          TEXT   NOT NULL,
    id                 TEXT   NOT NULL,
    person_id          TEXT   NOT NULL,
    person_pseudonym   TEXT   NOT NULL,
    kind               TEXT   NOT NULL,
    status             TEXT   NOT NULL,
    valid_from         BIGINT NOT NULL,
    valid_until        BIGINT,
    label              TEXT   NOT NULL,
    lookup_hash        TEXT,
    pin_hash           TEXT,
    unit_id            TEXT,
    sealed_secret      TEXT,
    qr_last_step       BIGINT,
    max_entries        BIGINT,
    entries_used       BIGINT NOT NULL,
    host_person_id     TEXT,
    face_enrolment_ref TEXT,
    consent_id         TEXT,
    version            BIGINT NOT NULL,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX credentials_lookup ON credentials (tenant_id, lookup_hash)
    WHERE lookup_hash IS NOT NULL AND status <> 'revoked';
CREATE INDEX credentials_person ON credentials (tenant_id, person_id);
CREATE INDEX credentials_unit ON credentials (tenant_id, unit_id);

CREATE TABLE credential_estates (
    tenant_id     TEXT NOT NULL,
    credential_id TEXT NOT NULL,
    estate_id     TEXT NOT NULL,
    PRIMARY KEY (tenant_id, credential_id, estate_id),
    FOREIGN KEY (tenant_id, credential_id) REFERENCES credentials (tenant_id, id)
);
CREATE INDEX credential_estates_estate ON credential_estates (tenant_id, estate_id);

CREATE TABLE estate_policies (
    tenant_id         TEXT   NOT NULL,
    estate_id         TEXT   NOT NULL,
    accepted_kinds    TEXT   NOT NULL,
    alternative_kinds TEXT   NOT NULL,
    updated_at        BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, estate_id)
);

-- A resident asked for a card as their alternative (R2): it waits for a
-- physical card while the credential issued at once keeps them moving.
CREATE TABLE card_requests (
    tenant_id    TEXT   NOT NULL,
    id           TEXT   NOT NULL,
    person_id    TEXT   NOT NULL,
    estate_id    TEXT   NOT NULL,
    requested_at BIGINT NOT NULL,
    status       TEXT   NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
