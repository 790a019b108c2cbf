-- Event uuids are unique per team, not across teams: one team's event must never suppress
-- another team's event with the same uuid. SQLite cannot drop a column's UNIQUE constraint, so
-- the table is rebuilt with the key on (team_id, uuid).
--
-- queue_position is the appliance's own column: the ingest-queue position of the batch whose
-- write inserted the row. After a crash between a sink write and the queuing of its after-write
-- deliveries, the deliveries are rebuilt from exactly the rows that batch inserted.
CREATE TABLE posthog_event_v2 (
    id             INTEGER PRIMARY KEY,
    uuid           TEXT    NOT NULL,
    event          TEXT    NOT NULL,
    properties     TEXT    NOT NULL DEFAULT '{}',
    elements_chain TEXT    NOT NULL DEFAULT '',
    timestamp      TEXT    NOT NULL,
    team_id        INTEGER NOT NULL,
    distinct_id    TEXT    NOT NULL,
    created_at     TEXT    NOT NULL,
    queue_position INTEGER NOT NULL DEFAULT 0
);

INSERT INTO posthog_event_v2 (id, uuid, event, properties, elements_chain, timestamp, team_id, distinct_id, created_at)
    SELECT id, uuid, event, properties, elements_chain, timestamp, team_id, distinct_id, created_at
    FROM posthog_event;

DROP TABLE posthog_event;
ALTER TABLE posthog_event_v2 RENAME TO posthog_event;

CREATE UNIQUE INDEX posthog_event_team_uuid ON posthog_event (team_id, uuid);
CREATE INDEX posthog_event_team_timestamp ON posthog_event (team_id, timestamp);
CREATE INDEX posthog_event_team_event_timestamp ON posthog_event (team_id, event, timestamp);
CREATE INDEX posthog_event_team_distinct_id ON posthog_event (team_id, distinct_id);
