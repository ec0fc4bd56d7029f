-- What this engine did to personal data (R11): one audit event per
-- enrolment, deletion, threshold change and staff search, written in the
-- transaction that made the change. Facematch reaches no other service (R9),
-- so the consent service pulls these events (`ReadJournal`) into the mesh's
-- audit outbox, deduplicated by event id. Pseudonyms and ids only (R17).
CREATE TABLE fm_journal (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT    NOT NULL UNIQUE,
    payload     BLOB    NOT NULL,
    recorded_at BIGINT  NOT NULL
);
