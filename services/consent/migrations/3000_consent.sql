-- Consent tables (R3-R5, R7, R16). Portable SQL for SQLite and PostgreSQL.
-- Keys start with tenant_id. Persons appear by id (to check guardians) and by
-- pseudonym (what facematch and audit know).

CREATE TABLE consent_notices (
    tenant_id      TEXT   NOT NULL,
    id             TEXT   NOT NULL,
    estate_id      TEXT   NOT NULL,
    version        BIGINT NOT NULL,
    effective_from BIGINT NOT NULL,
    published_at   BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX consent_notices_version ON consent_notices (tenant_id, estate_id, version);

CREATE TABLE consent_notice_texts (
    tenant_id   TEXT NOT NULL,
    notice_id   TEXT NOT NULL,
    language    TEXT NOT NULL,
    body        TEXT NOT NULL,
    text_sha256 TEXT NOT NULL,
    PRIMARY KEY (tenant_id, notice_id, language),
    FOREIGN KEY (tenant_id, notice_id) REFERENCES consent_notices (tenant_id, id)
);

CREATE TABLE consents (
    tenant_id              TEXT   NOT NULL,
    id                     TEXT   NOT NULL,
    estate_id              TEXT   NOT NULL,
    person_id              TEXT   NOT NULL,
    person_pseudonym       TEXT   NOT NULL,
    purpose                TEXT   NOT NULL,
    notice_id              TEXT   NOT NULL,
    notice_version         BIGINT NOT NULL,
    notice_text_sha256     TEXT   NOT NULL,
    method                 TEXT   NOT NULL,
    paper_form_scan_sha256 TEXT   NOT NULL,
    granted_by_guardian    BIGINT NOT NULL,
    guardian_person_id     TEXT,
    concerns_minor         BIGINT NOT NULL,
    status                 TEXT   NOT NULL,
    granted_at             BIGINT NOT NULL,
    withdrawn_at           BIGINT,
    deletion_request_id    TEXT,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, notice_id) REFERENCES consent_notices (tenant_id, id)
);
CREATE UNIQUE INDEX consents_one_active ON consents (tenant_id, estate_id, person_id, purpose) WHERE status = 'active';
CREATE INDEX consents_person ON consents (tenant_id, person_id);
CREATE INDEX consents_pseudonym ON consents (tenant_id, person_pseudonym, estate_id);

CREATE TABLE impact_assessments (
    tenant_id       TEXT   NOT NULL,
    id              TEXT   NOT NULL,
    estate_id       TEXT   NOT NULL,
    author          TEXT   NOT NULL,
    assessed_on     TEXT   NOT NULL,
    document_sha256 TEXT   NOT NULL,
    recorded_at     BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX impact_assessments_estate ON impact_assessments (tenant_id, estate_id);

CREATE TABLE face_verification (
    tenant_id     TEXT   NOT NULL,
    estate_id     TEXT   NOT NULL,
    enabled       BIGINT NOT NULL,
    assessment_id TEXT,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, estate_id)
);

-- Requests that facematch delete a person's face data at an estate (R5).
-- source_id (a consent id or a residency.end event id) makes every cause
-- produce exactly one request, however often the sweep runs.
CREATE TABLE face_deletion_requests (
    tenant_id        TEXT   NOT NULL,
    id               TEXT   NOT NULL,
    estate_id        TEXT   NOT NULL,
    person_pseudonym TEXT   NOT NULL,
    reason           TEXT   NOT NULL,
    source_id        TEXT   NOT NULL,
    requested_at     BIGINT NOT NULL,
    fulfilled_at     BIGINT,
    certificate_id   TEXT,
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX face_deletion_requests_source ON face_deletion_requests (tenant_id, source_id);

-- How far the deletion sweep has read the outbox.
CREATE TABLE consent_sweep_cursor (
    name     TEXT   NOT NULL PRIMARY KEY,
    last_seq BIGINT NOT NULL
);
