-- Entries by person (the resident's access report, queries by person),
-- moved out of audit_entries. An index there took a write to a random page
-- for every entry, inside the transaction that every gate decision waits
-- for: in the gate benchmark that was most of the database's work per
-- decision. The log's person indexer (AuditLog::index_persons) fills this
-- table behind the log's head, many entries per transaction;
-- audit_person_indexed says how far. A query by person reads this table
-- below that point and the entries themselves from it on, so nothing is
-- missed while the indexer catches up.

CREATE TABLE audit_person_entries (
    tenant_id        TEXT   NOT NULL,
    person_pseudonym TEXT   NOT NULL,
    idx              BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, person_pseudonym, idx)
);

-- Per tenant: every entry below next_idx is in audit_person_entries.
CREATE TABLE audit_person_indexed (
    tenant_id TEXT   NOT NULL PRIMARY KEY,
    next_idx  BIGINT NOT NULL
);

INSERT INTO audit_person_entries (tenant_id, person_pseudonym, idx)
    SELECT tenant_id, person_pseudonym, idx FROM audit_entries WHERE person_pseudonym <> '';
INSERT INTO audit_person_indexed (tenant_id, next_idx)
    SELECT tenant_id, MAX(idx) + 1 FROM audit_entries GROUP BY tenant_id;

DROP INDEX audit_entries_person;
