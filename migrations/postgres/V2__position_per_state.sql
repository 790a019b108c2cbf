-- Several boxes may share this database (NODE_ID names each box's position). A position row
-- remembers which appliance state file moves it, so that two boxes that were given the same
-- name (or none) are told apart instead of skipping each other's events.
ALTER TABLE appliance_sink_position ADD COLUMN state uuid;
