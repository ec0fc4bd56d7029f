-- The person and estate indexes as posting lists: one row per key (a
-- person pseudonym, an estate id) per indexed window, listing that key's
-- entries in the window, where audit_person_entries and
-- audit_estate_entries held a row per entry. The indexer wrote those rows
-- in transactions of 512 that each held the write turn every all-in-one
-- gate decision waits for for 2–3 ms, some eighty times a second under the
-- gate benchmark's load: the decisions' p99 (BENCHMARKS.md, session 26).
-- A window's postings are about a hundred rows, written with the mark in
-- one transaction.
--
-- entries: the posting's entries after first_idx, as the varint-encoded
-- gaps between them (AuditLog's encode_entries); the last is last_idx.
--
-- The old rows are not converted (SQL cannot write the encoding): the
-- marks are reset and the indexer rebuilds the postings from the log,
-- at full speed, behind the log's head. Until it is done, queries by
-- person or estate read the entries it has not reached yet themselves,
-- as they always do past the mark: slower, never incomplete.

DROP TABLE audit_person_entries;
DROP TABLE audit_estate_entries;
DELETE FROM audit_person_indexed;

CREATE TABLE audit_index_postings (
    tenant_id TEXT    NOT NULL,
    kind      TEXT    NOT NULL,
    index_key TEXT    NOT NULL,
    last_idx  BIGINT  NOT NULL,
    first_idx BIGINT  NOT NULL,
    entries   BLOB    NOT NULL,
    PRIMARY KEY (tenant_id, kind, index_key, last_idx)
);
