//! Identifiers every layer shares: teams, plugins, plugin configs and jobs.
//!
//! Owns: the id types, so that `event`, `store` and the layers above can name a team or a job
//! without importing each other.
//! Must never: import another module of the crate (it is the bottom layer).

/// A team (PostHog's project): events, plugin configs and persons belong to one.
pub type TeamId = u64;
/// An installed plugin.
pub type PluginId = u64;
/// A plugin enabled for a team, with its config values.
pub type PluginConfigId = u64;
/// A job in the durable job queue (a UUID v7, so ids sort by creation).
pub type JobId = uuid::Uuid;
