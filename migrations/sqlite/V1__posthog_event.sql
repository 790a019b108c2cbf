-- Events, in the columns of PostHog's event tables (posthog_event / ClickHouse `events`).
-- Timestamps are ISO 8601 UTC text with microseconds, so text order is time order.
CREATE TABLE posthog_event (
    id             INTEGER PRIMARY KEY,
    uuid           TEXT    NOT NULL UNIQUE,
    event          TEXT    NOT NULL,
    properties     TEXT    NOT NULL DEFAULT '{}',
    elements_chain TEXT    NOT NULL DEFAULT '',
    timestamp      TEXT    NOT NULL,
    team_id        INTEGER NOT NULL,
    distinct_id    TEXT    NOT NULL,
    created_at     TEXT    NOT NULL
);

CREATE INDEX posthog_event_team_timestamp ON posthog_event (team_id, timestamp);
CREATE INDEX posthog_event_team_event_timestamp ON posthog_event (team_id, event, timestamp);
CREATE INDEX posthog_event_team_distinct_id ON posthog_event (team_id, distinct_id);

-- How far into the appliance's ingest queue this database has committed, written in the same
-- transaction as the rows: a replay after a crash skips what is already here.
CREATE TABLE appliance_sink_position (
    sink     TEXT    PRIMARY KEY,
    position INTEGER NOT NULL
);
