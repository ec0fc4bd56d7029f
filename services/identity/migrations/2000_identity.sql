-- Identity tables. Portable SQL: the same file migrates SQLite and PostgreSQL.
-- Every key starts with tenant_id so the data can be sharded by tenant, and
-- foreign keys include tenant_id so a row can never point into another tenant
-- (R14). Phone numbers are stored only as a keyed hash plus last four digits.

CREATE TABLE tenants (
    id                TEXT   NOT NULL PRIMARY KEY,
    name              TEXT   NOT NULL,
    jurisdiction_code TEXT   NOT NULL,
    status            TEXT   NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL
);
CREATE UNIQUE INDEX tenants_active_name ON tenants (name) WHERE status = 'active';

CREATE TABLE estates (
    tenant_id         TEXT   NOT NULL REFERENCES tenants (id),
    id                TEXT   NOT NULL,
    name              TEXT   NOT NULL,
    address           TEXT   NOT NULL,
    jurisdiction_code TEXT   NOT NULL,
    status            TEXT   NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX estates_active_name ON estates (tenant_id, name) WHERE status = 'active';

CREATE TABLE gates (
    tenant_id       TEXT   NOT NULL,
    id              TEXT   NOT NULL,
    estate_id       TEXT   NOT NULL,
    name            TEXT   NOT NULL,
    direction       TEXT   NOT NULL,
    supported_kinds TEXT   NOT NULL,
    status          TEXT   NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, estate_id) REFERENCES estates (tenant_id, id)
);
CREATE UNIQUE INDEX gates_active_name ON gates (tenant_id, estate_id, name) WHERE status = 'active';

CREATE TABLE units (
    tenant_id  TEXT   NOT NULL,
    id         TEXT   NOT NULL,
    estate_id  TEXT   NOT NULL,
    building   TEXT   NOT NULL,
    entrance   TEXT   NOT NULL,
    room       TEXT   NOT NULL,
    status     TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, estate_id) REFERENCES estates (tenant_id, id)
);
CREATE UNIQUE INDEX units_active_address ON units (tenant_id, estate_id, building, entrance, room) WHERE status = 'active';

CREATE TABLE persons (
    tenant_id          TEXT   NOT NULL REFERENCES tenants (id),
    id                 TEXT   NOT NULL,
    display_name       TEXT   NOT NULL,
    phone_hash         TEXT   NOT NULL,
    phone_last4        TEXT   NOT NULL,
    birth_date         TEXT   NOT NULL,
    guardian_person_id TEXT,
    pseudonym          TEXT   NOT NULL,
    status             TEXT   NOT NULL,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX persons_phone ON persons (tenant_id, phone_hash);
CREATE UNIQUE INDEX persons_pseudonym ON persons (tenant_id, pseudonym);

CREATE TABLE residencies (
    tenant_id   TEXT   NOT NULL,
    id          TEXT   NOT NULL,
    person_id   TEXT   NOT NULL,
    unit_id     TEXT   NOT NULL,
    estate_id   TEXT   NOT NULL,
    role        TEXT   NOT NULL,
    valid_from  BIGINT NOT NULL,
    valid_until BIGINT,
    status      TEXT   NOT NULL,
    end_reason  TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, person_id) REFERENCES persons (tenant_id, id),
    FOREIGN KEY (tenant_id, unit_id) REFERENCES units (tenant_id, id)
);
CREATE INDEX residencies_person ON residencies (tenant_id, person_id);
CREATE INDEX residencies_unit ON residencies (tenant_id, unit_id);
CREATE INDEX residencies_estate ON residencies (tenant_id, estate_id);
