-- Facematch's own database (one SQLite file per tenant). Biometric data only:
-- no names, phones or units (R9). Templates are AES-256-GCM ciphertext under
-- the person's data key, which lives in the key vault, not here.
CREATE TABLE fm_meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One data key per person per estate.
CREATE TABLE fm_persons (
    estate_id        TEXT   NOT NULL,
    person_pseudonym TEXT   NOT NULL,
    key_id           TEXT   NOT NULL,
    consent_id       TEXT   NOT NULL,
    enrolled_at      BIGINT NOT NULL,
    PRIMARY KEY (estate_id, person_pseudonym)
);

CREATE TABLE fm_templates (
    id               TEXT   PRIMARY KEY,
    estate_id        TEXT   NOT NULL,
    person_pseudonym TEXT   NOT NULL,
    key_id           TEXT   NOT NULL,
    sealed           BLOB   NOT NULL,
    request_id       TEXT   NOT NULL UNIQUE,
    created_at       BIGINT NOT NULL
);
CREATE INDEX fm_templates_person ON fm_templates (estate_id, person_pseudonym);

-- Issued deletion certificates (R6), by request id for idempotency.
CREATE TABLE fm_certificates (
    id               TEXT   PRIMARY KEY,
    request_id       TEXT   NOT NULL UNIQUE,
    person_pseudonym TEXT   NOT NULL,
    body             BLOB   NOT NULL,
    key_id           TEXT   NOT NULL,
    signature        BLOB   NOT NULL,
    created_at       BIGINT NOT NULL
);

CREATE TABLE fm_thresholds (
    estate_id TEXT PRIMARY KEY,
    threshold DOUBLE PRECISION NOT NULL
);
