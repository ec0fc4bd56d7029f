-- An entry's event bytes and its two hashes as bytes (BYTEA), not hex text.
-- In hex they were stored, bound, copied and paged at twice their size,
-- in the commit that every all-in-one gate decision waits for
-- (BENCHMARKS.md, session 22). The log still keeps each event's bytes
-- exactly as appended, so that anyone holding an export can recompute its
-- leaf hash. PostgreSQL's own DDL (SQLite's is in migrations-sqlite).

ALTER TABLE audit_entries
    ADD COLUMN event BYTEA,
    ADD COLUMN leaf_bytes BYTEA,
    ADD COLUMN chain_bytes BYTEA;
UPDATE audit_entries
    SET event = decode(event_hex, 'hex'), leaf_bytes = decode(leaf_hash, 'hex'), chain_bytes = decode(chain_hash, 'hex');
ALTER TABLE audit_entries
    ALTER COLUMN event SET NOT NULL,
    ALTER COLUMN leaf_bytes SET NOT NULL,
    ALTER COLUMN chain_bytes SET NOT NULL,
    DROP COLUMN event_hex,
    DROP COLUMN leaf_hash,
    DROP COLUMN chain_hash;
ALTER TABLE audit_entries RENAME COLUMN leaf_bytes TO leaf_hash;
ALTER TABLE audit_entries RENAME COLUMN chain_bytes TO chain_hash;
