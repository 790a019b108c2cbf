//! Plugin benchmark: compile and instantiation time, and the cost per event of a
//! `process-event` plugin when events cross the boundary one per call and in batches: the
//! property filter (a plugin's real work included) and a passthrough that does nothing, whose
//! figure is the host's own overhead per event.
//!
//! `cargo run --release --bin pluginbench` (build the plugins first:
//! `cd plugins && cargo build --release --target wasm32-wasip2`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::config::Config;
use appliance::event::{EventRow, IngestBatch};
use appliance::plugins::{self, Chains};
use appliance::store::Store;

fn main() {
    if let Err(e) = run() {
        eprintln!("pluginbench: {e}");
        std::process::exit(1);
    }
}

fn event_row(n: u64) -> EventRow {
    let properties = serde_json::json!({
        "$current_url": "https://shop.example.com/products/42?utm_source=newsletter",
        "$browser": "Chrome", "$os": "Linux", "$lib": "web", "$lib_version": "1.449.2",
        "$session_id": "01a215ac-0381-71a2-b97f-b6fc0eb1981e", "secret": "s3cr3t", "n": n,
        "$ip": "203.0.113.9"
    });
    EventRow {
        uuid: uuid::Uuid::now_v7(),
        event: "$pageview".into(),
        distinct_id: format!("user-{}", n % 1000),
        properties: properties.to_string(),
        timestamp: chrono::Utc::now(),
        elements_chain: String::new(),
    }
}

fn batch(team_id: u64, size: u64) -> IngestBatch {
    IngestBatch {
        team_id,
        received_at: chrono::Utc::now(),
        sent_at: None,
        ip: Some("203.0.113.9".into()),
        events: (0..size).map(event_row).collect(),
    }
}

fn run() -> Result<(), String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins");
    let wasm = root.join("target/wasm32-wasip2/release/property_filter.wasm");
    if !wasm.exists() {
        return Err(format!(
            "{} is missing: build the plugins first",
            wasm.display()
        ));
    }
    let data = std::env::temp_dir().join(format!("appliance-pluginbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let config = Config::from_vars([("DATA_DIR".to_string(), data.display().to_string())])
        .map_err(|e| e.to_string())?;
    let store = Store::open(&data).map_err(|e| e.to_string())?;
    let team = store
        .create_team("bench", None)
        .map_err(|e| e.to_string())?;

    // Compile (cold), then load from the on-disk cache (warm), then instantiate.
    let bytes = std::fs::read(&wasm).map_err(|e| e.to_string())?;
    let runtime = Arc::new(appliance::app::plugin_runtime(&config).map_err(|e| e.to_string())?);
    let started = Instant::now();
    runtime.load(&bytes).map_err(|e| e.to_string())?;
    let cold = started.elapsed();
    let started = Instant::now();
    let fresh = appliance::app::plugin_runtime(&config).map_err(|e| e.to_string())?;
    fresh.load(&bytes).map_err(|e| e.to_string())?;
    let warm = started.elapsed();
    println!(
        "compile {:.1} ms (cold), load from cache {:.1} ms (warm, new engine included)",
        ms(cold),
        ms(warm)
    );

    // Two plugins: the property filter (real work: parse, remove a key, serialise) and a
    // passthrough that returns events untouched without parsing them (the host's own cost).
    let install = |crate_dir: &str, wasm_name: &str| -> Result<u64, String> {
        let folder = tempdir(&data, crate_dir.rsplit('/').next().unwrap_or(crate_dir));
        std::fs::copy(
            root.join(crate_dir).join("plugin.json"),
            folder.join("plugin.json"),
        )
        .map_err(|e| e.to_string())?;
        std::fs::copy(
            root.join("target/wasm32-wasip2/release").join(wasm_name),
            folder.join(wasm_name),
        )
        .map_err(|e| format!("{wasm_name}: {e}"))?;
        let record =
            plugins::install(&store, &runtime, &data, &folder).map_err(|e| e.to_string())?;
        Ok(record.id)
    };
    let filter = install("examples/property-filter", "property_filter.wasm")?;
    let passthrough = install("tests/passthrough", "passthrough.wasm")?;
    let values = [("properties".to_string(), "secret".to_string())]
        .into_iter()
        .collect();
    store
        .upsert_plugin_config(team.id, filter, true, None, Some(values))
        .map_err(|e| e.to_string())?;
    let other = store
        .create_team("bench-passthrough", None)
        .map_err(|e| e.to_string())?;
    store
        .upsert_plugin_config(other.id, passthrough, true, None, None)
        .map_err(|e| e.to_string())?;
    let catalog = Arc::new(appliance::plugins::Catalog::new(
        runtime.clone(),
        store.clone(),
        &data,
        appliance::plugins::PluginPolicy::closed(),
        None,
        Arc::new(appliance::geoip::GeoIp::disabled()),
    ));

    // Instantiation: a new chain instantiates its plugin on its first batch.
    let rounds = 50;
    let mut total = Duration::ZERO;
    for _ in 0..rounds {
        let mut chains = Chains::new(catalog.clone());
        chains.refresh().map_err(|e| e.to_string())?;
        let mut one = batch(team.id, 1);
        let started = Instant::now();
        chains.process(&mut one);
        total += started.elapsed();
    }
    println!(
        "instantiate + setup + first call: {:.3} ms mean over {rounds}",
        ms(total) / rounds as f64
    );

    let mut chains = Chains::new(catalog);
    chains.refresh().map_err(|e| e.to_string())?;
    chains.process(&mut batch(team.id, 1));
    chains.process(&mut batch(other.id, 1));
    for (plugin, team_id) in [("property filter", team.id), ("passthrough", other.id)] {
        for (label, size, calls) in [
            ("one event per call", 1u64, 20_000u64),
            ("batches of 100", 100, 200),
            ("batches of 1000", 1000, 20),
        ] {
            let mut batches: Vec<IngestBatch> = (0..calls).map(|_| batch(team_id, size)).collect();
            let started = Instant::now();
            for b in &mut batches {
                chains.process(b);
            }
            let elapsed = started.elapsed();
            let events = size * calls;
            let filtered = batches
                .iter()
                .all(|b| b.events.iter().all(|e| !e.properties.contains("s3cr3t")));
            assert_eq!(filtered, team_id == team.id, "the {plugin} plugin ran");
            println!(
                "{plugin:<16} {label:<20} {:>7.2} µs per event ({:>9.0} events/s)",
                elapsed.as_secs_f64() * 1e6 / events as f64,
                events as f64 / elapsed.as_secs_f64()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn tempdir(parent: &std::path::Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    let _ = std::fs::create_dir_all(&dir);
    dir
}
