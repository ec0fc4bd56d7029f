-- Audit outbox (R11): one row per state change, written in the same
-- transaction as the change; a relay ships it to the audit service and then
-- marks it delivered. Rows carry pseudonyms and ids only (R17).
CREATE TABLE outbox_events (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id         TEXT    NOT NULL UNIQUE,
    tenant_id        TEXT    NOT NULL,
    source           TEXT    NOT NULL,
    action           TEXT    NOT NULL,
    object_type      TEXT    NOT NULL,
    object_id        TEXT    NOT NULL,
    estate_id        TEXT    NOT NULL,
    person_pseudonym TEXT    NOT NULL,
    occurred_at      BIGINT  NOT NULL,
    payload          BLOB    NOT NULL,
    delivered_at     BIGINT
);
CREATE INDEX outbox_events_pending ON outbox_events (delivered_at, seq);
CREATE INDEX outbox_events_tenant ON outbox_events (tenant_id, seq);
