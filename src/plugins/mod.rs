//! Plugins: WebAssembly components, run by wasmtime, that transform events on the way in and
//! export them, run jobs and schedules after.
//!
//! Owns: the plugin contract's host side ([`host`]), the engine, compilation cache and limits
//! ([`runtime`]), `plugin.json` ([`manifest`]), installing plugins ([`install`]), what is
//! installed and enabled, compiled and ready ([`catalog`]), each team's chain of
//! `process-event` plugins ([`chain`]), reloaded when plugin configs change, and plugins' work
//! outside the chain as jobs ([`tasks`]) on instances kept between jobs ([`idle`]).
//! Must never: let a plugin's failure (trap, timeout, memory, garbage) stop the pipeline or touch
//! another plugin config or team; a failing plugin is logged against its config with the event
//! uuids, the events continue unchanged, and after many consecutive failures that one config is
//! disabled, visibly.

mod archive;
pub mod catalog;
pub mod chain;
pub mod host;
mod idle;
pub mod install;
pub mod manifest;
pub mod runtime;
pub mod tasks;

use std::path::{Path, PathBuf};

use crate::store::StoreError;
pub use catalog::{Catalog, Entry, PluginPolicy};
pub use chain::{Chains, Readiness};
pub use install::{install, install_archive, install_parts};
use manifest::ManifestError;

/// Consecutive failing calls after which a plugin config is disabled.
pub const DISABLE_AFTER_FAILURES: u32 = 20;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin runtime: {0}")]
    Runtime(String),
    #[error("not a valid plugin component: {0}")]
    InvalidComponent(String),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{0}")]
    Io(String),
    #[error("not a usable plugin archive: {0}")]
    InvalidArchive(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    NotFound(String),
    #[error("the plugin failed when loaded: {0}")]
    Instantiate(String),
    #[error("{0}")]
    BadRequest(String),
}

/// Where installed components are kept, by content hash.
pub fn plugin_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("plugins")
}
