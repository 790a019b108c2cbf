-- PostHog's ClickHouse tables on a single node (posthog/models/event/sql.py, person/sql.py,
-- group/sql.py): the same columns, types and sort keys, as the plain ReplacingMergeTree that
-- PostHog renders when it is not sharded. A replayed row collapses into the first by the sort
-- key; a retried insert is dropped whole by its deduplication token, which a non-replicated
-- MergeTree honours only with a deduplication window.

CREATE TABLE IF NOT EXISTS events
(
    uuid UUID,
    event VARCHAR,
    properties VARCHAR CODEC(ZSTD(3)),
    timestamp DateTime64(6, 'UTC'),
    team_id Int64,
    distinct_id VARCHAR,
    elements_chain VARCHAR,
    created_at DateTime64(6, 'UTC'),
    person_id UUID,
    person_created_at DateTime64,
    person_properties VARCHAR CODEC(ZSTD(3)),
    group0_properties VARCHAR CODEC(ZSTD(3)),
    group1_properties VARCHAR CODEC(ZSTD(3)),
    group2_properties VARCHAR CODEC(ZSTD(3)),
    group3_properties VARCHAR CODEC(ZSTD(3)),
    group4_properties VARCHAR CODEC(ZSTD(3)),
    group0_created_at DateTime64,
    group1_created_at DateTime64,
    group2_created_at DateTime64,
    group3_created_at DateTime64,
    group4_created_at DateTime64,
    person_mode Enum8('full' = 0, 'propertyless' = 1, 'force_upgrade' = 2),
    `$group_0` VARCHAR MATERIALIZED replaceRegexpAll(JSONExtractRaw(properties, '$group_0'), '^"|"$', ''),
    `$group_1` VARCHAR MATERIALIZED replaceRegexpAll(JSONExtractRaw(properties, '$group_1'), '^"|"$', ''),
    `$group_2` VARCHAR MATERIALIZED replaceRegexpAll(JSONExtractRaw(properties, '$group_2'), '^"|"$', ''),
    `$group_3` VARCHAR MATERIALIZED replaceRegexpAll(JSONExtractRaw(properties, '$group_3'), '^"|"$', ''),
    `$group_4` VARCHAR MATERIALIZED replaceRegexpAll(JSONExtractRaw(properties, '$group_4'), '^"|"$', ''),
    `$window_id` VARCHAR MATERIALIZED replaceRegexpAll(JSONExtractRaw(properties, '$window_id'), '^"|"$', ''),
    `$session_id` VARCHAR MATERIALIZED replaceRegexpAll(JSONExtractRaw(properties, '$session_id'), '^"|"$', ''),
    _timestamp DateTime,
    _offset UInt64,
    INDEX kafka_timestamp_minmax_events _timestamp TYPE minmax GRANULARITY 3
)
ENGINE = ReplacingMergeTree(_timestamp)
PARTITION BY toYYYYMM(timestamp)
ORDER BY (team_id, toDate(timestamp), event, cityHash64(distinct_id), cityHash64(uuid))
SAMPLE BY cityHash64(distinct_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS person
(
    id UUID,
    created_at DateTime64,
    team_id Int64,
    properties VARCHAR,
    is_identified Int8,
    is_deleted Int8,
    version UInt64,
    _timestamp DateTime,
    _offset UInt64,
    INDEX kafka_timestamp_minmax_person _timestamp TYPE minmax GRANULARITY 3
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (team_id, id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS person_distinct_id2
(
    team_id Int64,
    distinct_id VARCHAR,
    person_id UUID,
    is_deleted Int8,
    version Int64,
    _timestamp DateTime,
    _offset UInt64,
    _partition UInt64,
    INDEX kafka_timestamp_minmax_person_distinct_id2 _timestamp TYPE minmax GRANULARITY 3
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (team_id, distinct_id)
SETTINGS index_granularity = 512, non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS groups
(
    group_type_index UInt8,
    group_key VARCHAR,
    created_at DateTime64,
    team_id Int64,
    group_properties VARCHAR,
    _timestamp DateTime,
    _offset UInt64
)
ENGINE = ReplacingMergeTree(_timestamp)
ORDER BY (team_id, group_type_index, group_key)
SETTINGS non_replicated_deduplication_window = 10000;
