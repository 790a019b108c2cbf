//! appliance: self-hosted PostHog event ingestion in one binary.
//!
//! See `ARCHITECTURE.md` for the flow of an event and the invariants each module keeps.

pub mod admin;
pub mod app;
pub mod backup;
pub mod capture;
pub mod cli;
pub mod codec;
pub mod config;
pub mod event;
pub mod failpoint;
pub mod geoip;
pub mod ids;
pub mod ingest;
pub mod jobs;
pub mod ops;
pub mod person;
pub mod pipeline;
pub mod plugins;
pub mod schedule;
pub mod serve;
pub mod shutdown;
pub mod sinks;
pub mod sources;
pub mod store;
pub mod telemetry;
pub mod wake;
