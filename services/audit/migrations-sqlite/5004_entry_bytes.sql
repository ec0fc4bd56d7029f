-- An entry's event bytes and its two hashes as bytes (BLOB), not hex text.
-- In hex they were stored, bound, copied and paged at twice their size,
-- in the commit that every all-in-one gate decision waits for
-- (BENCHMARKS.md, session 22). The log still keeps each event's bytes
-- exactly as appended, so that anyone holding an export can recompute its
-- leaf hash. SQLite's own DDL (PostgreSQL's is in migrations-postgres).

ALTER TABLE audit_entries ADD COLUMN event BLOB NOT NULL DEFAULT x'';
ALTER TABLE audit_entries ADD COLUMN leaf_bytes BLOB NOT NULL DEFAULT x'';
ALTER TABLE audit_entries ADD COLUMN chain_bytes BLOB NOT NULL DEFAULT x'';
UPDATE audit_entries SET event = unhex(event_hex), leaf_bytes = unhex(leaf_hash), chain_bytes = unhex(chain_hash);
ALTER TABLE audit_entries DROP COLUMN event_hex;
ALTER TABLE audit_entries DROP COLUMN leaf_hash;
ALTER TABLE audit_entries DROP COLUMN chain_hash;
ALTER TABLE audit_entries RENAME COLUMN leaf_bytes TO leaf_hash;
ALTER TABLE audit_entries RENAME COLUMN chain_bytes TO chain_hash;
