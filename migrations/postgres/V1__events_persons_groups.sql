-- The Postgres sink's tables, in the names, columns and types of PostHog's Postgres tables:
-- posthog_event of PostHog's Postgres mode (properties as jsonb, timestamps as timestamptz) with
-- the person columns of PostHog's ClickHouse `events`, posthog_person, posthog_persondistinctid,
-- posthog_grouptypemapping and posthog_group. team_id is bigint (PostHog: integer) so that any
-- team id the appliance gives fits; group types and keys are text (PostHog: varchar(400)) so
-- that no key the SDKs send can stop the sink.
CREATE TABLE posthog_event (
    id                BIGSERIAL    PRIMARY KEY,
    uuid              uuid         NOT NULL,
    event             text         NOT NULL,
    properties        jsonb        NOT NULL DEFAULT '{}',
    elements          jsonb                 DEFAULT '[]',
    elements_hash     varchar(200),
    elements_chain    text         NOT NULL DEFAULT '',
    timestamp         timestamptz  NOT NULL,
    team_id           bigint       NOT NULL,
    distinct_id       text         NOT NULL,
    created_at        timestamptz  NOT NULL DEFAULT now(),
    person_id         uuid,
    person_properties jsonb        NOT NULL DEFAULT '{}',
    person_created_at timestamptz,
    person_mode       text         NOT NULL DEFAULT 'full',
    -- The appliance's own column: the ingest-queue position of the batch whose write inserted
    -- the row (after a crash, that batch's deliveries are rebuilt from exactly these rows).
    queue_position    bigint       NOT NULL DEFAULT 0
);
-- PostHog's index on (timestamp, team_id, event), and the key that makes every write idempotent.
-- Nothing else: each index is paid on every insert (measured: the five of an earlier draft cost
-- more than half of the insert time), and an operator can add what their queries need.
CREATE UNIQUE INDEX posthog_event_team_uuid ON posthog_event (team_id, uuid);
CREATE INDEX posthog_event_timestamp_team_event ON posthog_event (timestamp, team_id, event);

-- How far into the appliance's ingest queue this database has committed, written in the same
-- transaction as the rows.
CREATE TABLE appliance_sink_position (
    sink     text   PRIMARY KEY,
    position bigint NOT NULL
);

CREATE TABLE posthog_person (
    id                         BIGSERIAL   PRIMARY KEY,
    created_at                 timestamptz NOT NULL,
    properties_last_updated_at jsonb                DEFAULT '{}',
    properties_last_operation  jsonb,
    team_id                    bigint      NOT NULL,
    properties                 jsonb       NOT NULL DEFAULT '{}',
    is_user_id                 integer,
    is_identified              boolean     NOT NULL DEFAULT false,
    uuid                       uuid        NOT NULL,
    version                    bigint
);
CREATE UNIQUE INDEX posthog_person_team_uuid ON posthog_person (team_id, uuid);
CREATE INDEX posthog_person_uuid ON posthog_person (uuid);

CREATE TABLE posthog_persondistinctid (
    id          BIGSERIAL    PRIMARY KEY,
    team_id     bigint       NOT NULL,
    person_id   bigint       NOT NULL REFERENCES posthog_person (id),
    distinct_id varchar(400) NOT NULL,
    version     bigint,
    CONSTRAINT "unique distinct_id for team" UNIQUE (team_id, distinct_id)
);
CREATE INDEX posthog_persondistinctid_person ON posthog_persondistinctid (person_id);

CREATE TABLE posthog_grouptypemapping (
    id               BIGSERIAL    PRIMARY KEY,
    team_id          bigint       NOT NULL,
    group_type       text         NOT NULL,
    group_type_index integer      NOT NULL,
    name_singular    varchar(400),
    name_plural      varchar(400),
    CONSTRAINT unique_group_types_for_project UNIQUE (team_id, group_type),
    CONSTRAINT unique_event_ordering UNIQUE (team_id, group_type_index)
);

CREATE TABLE posthog_group (
    id                         BIGSERIAL    PRIMARY KEY,
    team_id                    bigint       NOT NULL,
    group_key                  text         NOT NULL,
    group_type_index           integer      NOT NULL,
    group_properties           jsonb        NOT NULL DEFAULT '{}',
    created_at                 timestamptz  NOT NULL,
    properties_last_updated_at jsonb        NOT NULL DEFAULT '{}',
    properties_last_operation  jsonb        NOT NULL DEFAULT '{}',
    version                    bigint       NOT NULL,
    CONSTRAINT unique_team_group_key_type UNIQUE (team_id, group_key, group_type_index)
);
