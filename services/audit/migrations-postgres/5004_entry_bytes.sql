-- An entry's event bytes and its two hashes as bytes (BYTEA), not hex text.
-- Written in hex, each entry was twice its size: the event's encoding went
-- to the database as ~700 characters, and every insert of the all-in-one
-- gate's decisions copied, bound and paged twice the bytes it needed
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
