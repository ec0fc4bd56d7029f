-- Where the move-out sweep has read the outbox up to (residency.end events).
CREATE TABLE credentials_sweep_cursor (
    name     TEXT   NOT NULL PRIMARY KEY,
    last_seq BIGINT NOT NULL
);
