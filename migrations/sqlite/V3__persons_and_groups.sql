-- Persons, distinct ids and groups, in the shape of PostHog's Postgres tables
-- (posthog_person, posthog_persondistinctid, posthog_group, posthog_grouptypemapping), and the
-- person columns of PostHog's ClickHouse `events` on each event row.
ALTER TABLE posthog_event ADD COLUMN person_id TEXT;
ALTER TABLE posthog_event ADD COLUMN person_properties TEXT NOT NULL DEFAULT '{}';
ALTER TABLE posthog_event ADD COLUMN person_created_at TEXT;
ALTER TABLE posthog_event ADD COLUMN person_mode TEXT NOT NULL DEFAULT 'full';

CREATE TABLE posthog_person (
    id                          INTEGER PRIMARY KEY,
    created_at                  TEXT    NOT NULL,
    properties_last_updated_at  TEXT    NOT NULL DEFAULT '{}',
    properties_last_operation   TEXT,
    team_id                     INTEGER NOT NULL,
    properties                  TEXT    NOT NULL DEFAULT '{}',
    is_user_id                  INTEGER,
    is_identified               INTEGER NOT NULL DEFAULT 0,
    uuid                        TEXT    NOT NULL,
    version                     INTEGER
);
CREATE UNIQUE INDEX posthog_person_team_uuid ON posthog_person (team_id, uuid);

CREATE TABLE posthog_persondistinctid (
    id          INTEGER PRIMARY KEY,
    team_id     INTEGER NOT NULL,
    person_id   INTEGER NOT NULL REFERENCES posthog_person (id),
    distinct_id TEXT    NOT NULL,
    version     INTEGER
);
CREATE UNIQUE INDEX posthog_persondistinctid_team_distinct_id
    ON posthog_persondistinctid (team_id, distinct_id);
CREATE INDEX posthog_persondistinctid_person ON posthog_persondistinctid (person_id);

CREATE TABLE posthog_grouptypemapping (
    id               INTEGER PRIMARY KEY,
    team_id          INTEGER NOT NULL,
    group_type       TEXT    NOT NULL,
    group_type_index INTEGER NOT NULL
);
CREATE UNIQUE INDEX posthog_grouptypemapping_team_type ON posthog_grouptypemapping (team_id, group_type);
CREATE UNIQUE INDEX posthog_grouptypemapping_team_index ON posthog_grouptypemapping (team_id, group_type_index);

CREATE TABLE posthog_group (
    id                          INTEGER PRIMARY KEY,
    team_id                     INTEGER NOT NULL,
    group_key                   TEXT    NOT NULL,
    group_type_index            INTEGER NOT NULL,
    group_properties            TEXT    NOT NULL DEFAULT '{}',
    created_at                  TEXT    NOT NULL,
    properties_last_updated_at  TEXT    NOT NULL DEFAULT '{}',
    properties_last_operation   TEXT    NOT NULL DEFAULT '{}',
    version                     INTEGER NOT NULL
);
CREATE UNIQUE INDEX posthog_group_team_key ON posthog_group (team_id, group_key, group_type_index);
