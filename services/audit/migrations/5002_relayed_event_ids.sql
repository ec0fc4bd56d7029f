-- Event ids are unique where a duplicate can arrive, and only there.
--
-- An event that reaches the log through a relay (an outbox shipped by a
-- service's relay, or the Append call) can arrive twice: a relay that
-- crashes between the append and marking the outbox row sends it again.
-- The unique index on (tenant, event id) turns that resend into a skipped
-- duplicate. An event appended in the transaction that decided it (the
-- all-in-one gate's card decisions, AuditSink::append_committed) is
-- appended exactly once by construction, with a fresh id; indexing its id
-- cost every such commit a write to one more B-tree page, and in the gate
-- benchmark most commits are a decision or two (BENCHMARKS.md, session 11).
--
-- `relayed` says which way an entry came (1: through a relay). Entries
-- already in the log keep their ids indexed.

ALTER TABLE audit_entries ADD COLUMN relayed BIGINT NOT NULL DEFAULT 1;
DROP INDEX audit_entries_event;
CREATE UNIQUE INDEX audit_entries_relayed_event ON audit_entries (tenant_id, event_id) WHERE relayed = 1;
