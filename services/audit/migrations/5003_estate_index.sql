-- Entries by estate (an estate-limited operator's queries, exports of one
-- estate), moved out of audit_entries as the person index was (5001): an
-- index there took a write to one more B-tree page in every commit of the
-- log, which at the all-in-one gate's rates is most commits of a decision
-- or two (BENCHMARKS.md, session 11). The log's indexer
-- (AuditLog::index_entries) fills this table together with
-- audit_person_entries, behind the log's head, under the same per-tenant
-- mark (audit_person_indexed.next_idx: every entry below it is in both
-- tables). Every existing entry is listed here, beyond the mark too; rows
-- past the mark are never read and are written again harmlessly.

CREATE TABLE audit_estate_entries (
    tenant_id TEXT   NOT NULL,
    estate_id TEXT   NOT NULL,
    idx       BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, estate_id, idx)
);

INSERT INTO audit_estate_entries (tenant_id, estate_id, idx)
    SELECT tenant_id, estate_id, idx FROM audit_entries WHERE estate_id <> '';

DROP INDEX audit_entries_estate;
