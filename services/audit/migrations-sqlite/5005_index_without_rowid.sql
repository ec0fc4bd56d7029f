-- The person and estate indexes as WITHOUT ROWID tables. Their rows are
-- nothing but their primary key, so a rowid table kept every row twice: in
-- the table's own B-tree, ordered by rowid, and in the primary key's index.
-- Each index row the indexer inserted wrote both B-trees, while holding the
-- write turn that every all-in-one gate decision waits for (BENCHMARKS.md,
-- session 23). Keyed by the primary key alone, each row is written once.
-- The rows are copied as they are; PostgreSQL has no rowid, so nothing
-- changes there.

CREATE TABLE audit_person_entries_by_key (
    tenant_id        TEXT   NOT NULL,
    person_pseudonym TEXT   NOT NULL,
    idx              BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, person_pseudonym, idx)
) WITHOUT ROWID;
INSERT INTO audit_person_entries_by_key (tenant_id, person_pseudonym, idx)
    SELECT tenant_id, person_pseudonym, idx FROM audit_person_entries;
DROP TABLE audit_person_entries;
ALTER TABLE audit_person_entries_by_key RENAME TO audit_person_entries;

CREATE TABLE audit_estate_entries_by_key (
    tenant_id TEXT   NOT NULL,
    estate_id TEXT   NOT NULL,
    idx       BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, estate_id, idx)
) WITHOUT ROWID;
INSERT INTO audit_estate_entries_by_key (tenant_id, estate_id, idx)
    SELECT tenant_id, estate_id, idx FROM audit_estate_entries;
DROP TABLE audit_estate_entries;
ALTER TABLE audit_estate_entries_by_key RENAME TO audit_estate_entries;
