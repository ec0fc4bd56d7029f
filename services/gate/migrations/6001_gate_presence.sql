-- Anti-passback presence kept by a gate service without Redis (the embedded
-- default): the last passage of each person at each estate, so that a
-- restart does not forget who is inside. Persons are named by their
-- pseudonymous id only (R17). Rows older than a day are pruned at start.
CREATE TABLE gate_presence (
    tenant_id TEXT   NOT NULL,
    estate_id TEXT   NOT NULL,
    person    TEXT   NOT NULL,
    direction TEXT   NOT NULL,
    passed_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, estate_id, person)
);
