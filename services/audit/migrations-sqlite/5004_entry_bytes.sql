-- An entry's event bytes and its two hashes as bytes (BLOB), not hex text.
-- Written in hex, each entry was twice its size: the event's encoding went
-- to the database as ~700 characters, and every insert of the all-in-one
-- gate's decisions copied, bound and paged twice the bytes it needed
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
