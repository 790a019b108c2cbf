//! Load generator and benchmark for capture: drives a real appliance over HTTP with many
//! keep-alive connections and prints events/s and acknowledgement latency (p50/p99), for single
//! events (`/e/`) and batches (`/batch/`), then the end-to-end rate at which events reach the
//! sink. With no `--url` it starts `appliance` from its own directory on a temporary data dir.
//!
//! `cargo run --release --bin loadgen` runs every scenario with the defaults; `--ceiling` also
//! drives a bare parse-only server ([`ceiling`]) with the same load, for the share of it the
//! appliance reaches.

mod ceiling;
mod drive;
mod events;
mod shared;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use drive::{run, Shape};
use events::Events;
use serde_json::{json, Value};
use shared::{events_stored, ready, Server};

const TOKEN: &str = "phc_loadgenProjectToken000";

#[derive(Parser, Debug, Clone)]
#[command(about = "Capture benchmark: throughput and acknowledgement latency over real HTTP")]
struct Args {
    /// Base URL of a running appliance; by default one is started on a temporary data directory
    #[arg(long)]
    url: Option<String>,
    /// Project token to send (must exist on --url; created automatically otherwise)
    #[arg(long, default_value = TOKEN)]
    token: String,
    /// Seconds each scenario runs
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Concurrent keep-alive connections
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Events per /batch/ request
    #[arg(long, default_value_t = 50)]
    batch_size: usize,
    /// Run only these scenarios: single, batch (default both)
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Enable a chain of three process-event plugins (property filter, two taggers) for the
    /// team; needs the plugins built (`cd plugins && cargo build --release --target wasm32-wasip2`)
    #[arg(long)]
    plugin_chain: bool,
    /// Measure memory instead: RSS at rest with one plugin enabled, then the peak RSS while
    /// capturing --memory-rate events/s in batches of 50 for --duration seconds
    #[arg(long)]
    memory: bool,
    /// Events per second of the memory scenario
    #[arg(long, default_value_t = 10_000.0)]
    memory_rate: f64,
    /// What each event carries: `trimmed` (the 17 properties of a posthog-js `$pageview` that
    /// matter most), `posthog-js` (all 75 properties a captured posthog-js `$pageview`
    /// carries, for an identified user, so the person step does its full work) or `personless`
    /// (`trimmed` with `$process_person_profile: false`, as posthog-js sends it for an
    /// anonymous user under `person_profiles: 'identified_only'`: no person is processed, so
    /// the same build measures what person processing costs) or `browsing` (`trimmed`, each
    /// event on another page, so the person's page properties differ from every event's)
    #[arg(long, value_enum, default_value_t = Events::Trimmed)]
    events: Events,
    /// Before each scenario's full load, run the same load against a bare axum server that only
    /// parses each body with serde_json (nothing durable), and print the appliance's share of it
    #[arg(long)]
    ceiling: bool,
    /// Serve as that bare server (how `--ceiling` starts it)
    #[arg(long, hide = true)]
    bare_server: bool,
}

/// The targets on a 2-core machine; latency is also measured at half of each.
const TARGET_SINGLE_REQUESTS: f64 = 15_000.0;
const TARGET_BATCH_EVENTS: f64 = 50_000.0;

/// Waits until the sink has everything the queue holds; returns when that happened.
async fn wait_drained(client: &reqwest::Client, base: &str) -> Instant {
    loop {
        let r = ready(client, base).await;
        if r["sink"]["position"].as_u64().is_some()
            && r["sink"]["position"] == r["queue"]["last_seq"]
        {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every follower sink has copied everything the lead wrote; returns when that
/// happened (at once when there are none).
async fn wait_followers(client: &reqwest::Client, base: &str) -> Instant {
    loop {
        let r = ready(client, base).await;
        let caught_up = r["sinks"]
            .as_array()
            .is_none_or(|sinks| sinks.iter().skip(1).all(|s| s["lag"] == 0));
        if caught_up {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Installs and enables the first `count` plugins of the benchmark chain for team 1.
fn install_plugin_chain(
    exe: &std::path::Path,
    dir: &std::path::Path,
    count: usize,
) -> Result<(), String> {
    let plugins = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins");
    let built = plugins.join("target/wasm32-wasip2/release");
    let chain: [(&str, &str, &str, &[&str]); 3] = [
        (
            "Property Filter",
            "examples/property-filter",
            "property_filter.wasm",
            &["properties=secret"],
        ),
        (
            "Tag A",
            "tests/hostile",
            "hostile.wasm",
            &["mode=tag", "name=a"],
        ),
        (
            "Tag B",
            "tests/hostile",
            "hostile.wasm",
            &["mode=tag", "name=b"],
        ),
    ];
    for (name, crate_dir, wasm, config) in chain.into_iter().take(count) {
        let folder = dir.join(format!("plugin-{}", name.replace(' ', "-")));
        std::fs::create_dir_all(&folder).map_err(|e| e.to_string())?;
        let manifest_text = std::fs::read_to_string(plugins.join(crate_dir).join("plugin.json"))
            .map_err(|e| e.to_string())?;
        let mut manifest: Value =
            serde_json::from_str(&manifest_text).map_err(|e| e.to_string())?;
        manifest["name"] = json!(name);
        std::fs::write(folder.join("plugin.json"), manifest.to_string())
            .map_err(|e| e.to_string())?;
        std::fs::copy(built.join(wasm), folder.join(wasm))
            .map_err(|e| format!("{wasm}: {e} (build the plugins first)"))?;
        let mut enable = vec![
            "plugin".to_owned(),
            "enable".into(),
            "--team".into(),
            "1".into(),
            name.into(),
        ];
        for c in config {
            enable.extend(["--config".to_owned(), (*c).to_owned()]);
        }
        for args in [
            vec![
                "plugin".to_owned(),
                "install".into(),
                folder.display().to_string(),
            ],
            enable,
        ] {
            let out = Command::new(exe)
                .env("DATA_DIR", dir)
                .args(&args)
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
        }
    }
    Ok(())
}

fn start_server(plugins: usize) -> Result<(Server, String), String> {
    let exe = shared::appliance_exe()?;
    let dir = shared::data_dir(&exe, "loadgen", TOKEN)?;
    if plugins > 0 {
        install_plugin_chain(&exe, &dir, plugins)?;
    }
    shared::spawn(&exe, dir)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.bare_server {
        if let Err(e) = ceiling::serve().await {
            eprintln!("loadgen: the bare server: {e}");
            std::process::exit(1);
        }
        return;
    }
    let bare = if args.ceiling {
        match ceiling::spawn() {
            Ok(bare) => Some(bare),
            Err(e) => {
                eprintln!("loadgen: {e}");
                std::process::exit(1);
            }
        }
    } else {
        None
    };
    let (_server, base) = match &args.url {
        Some(url) => (None, url.trim_end_matches('/').to_owned()),
        None => match start_server(if args.memory {
            1
        } else if args.plugin_chain {
            3
        } else {
            0
        }) {
            Ok((server, addr)) => (Some(server), addr),
            Err(e) => {
                eprintln!("loadgen: {e}");
                std::process::exit(1);
            }
        },
    };
    if args.memory {
        let Some(pid) = _server.as_ref().map(|s| s.child.id()) else {
            eprintln!("loadgen: --memory starts its own appliance; leave out --url");
            std::process::exit(2);
        };
        memory(pid, &base, &args).await;
        return;
    }
    let pid = _server.as_ref().map(|s| s.child.id());
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let duration = Duration::from_secs(args.duration);
    let client = reqwest::Client::new();
    println!(
        "capture benchmark against {base}: {} connections, {} s per scenario, {} cores{}",
        args.connections,
        args.duration,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        if args.plugin_chain {
            ", chain of 3 process-event plugins"
        } else {
            ""
        }
    );
    let mut scenarios = Vec::new();
    if wanted("single") {
        scenarios.push(("single events POST /e/".to_owned(), Shape::Single));
    }
    if wanted("batch") {
        scenarios.push((
            format!("batches of {} POST /batch/", args.batch_size),
            Shape::Batch(args.batch_size),
        ));
    }
    for (label, shape) in scenarios {
        let before = ready(&client, &base).await;
        let written_before = events_stored(&before);
        let stored_by = |r: &Value| -> Vec<(String, u64)> {
            r["sinks"]
                .as_array()
                .map(|sinks| {
                    sinks
                        .iter()
                        .map(|s| {
                            let name = s["name"].as_str().unwrap_or("?").to_owned();
                            (name, s["events_stored"].as_u64().unwrap_or(0))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let sinks_before = stored_by(&before);
        // The scenario's load on the server at `url`, at full speed (`None`) or paced at `rate`
        // requests/s: on the appliance, and on the bare server when asked for.
        let load_on = |url: String, rate: Option<f64>| {
            let token = args.token.clone();
            async move {
                run(
                    &url,
                    &token,
                    shape,
                    args.events,
                    args.connections,
                    duration,
                    rate,
                )
                .await
            }
        };
        let load = |rate: Option<f64>| load_on(base.clone(), rate);
        let on_bare = |rate: Option<f64>| {
            let bare_url = bare.as_ref().map(|(_, url)| url.clone());
            async move {
                match bare_url {
                    Some(url) => Some(load_on(url, rate).await),
                    None => None,
                }
            }
        };
        let ceiling = on_bare(None).await.map(|bare| {
            bare.print(&format!("{label}, ceiling (bare parse, nothing durable)"));
            bare.request_rate()
        });
        let cpu_before = pid.map(cpu_seconds);
        let load_start = Instant::now();
        let full = load(None).await;
        full.print(&format!("{label}, max load"));
        if let Some(ceiling) = ceiling {
            println!(
                "{:<58} {:>9.1} % of the ceiling's requests/s",
                format!("{label}, share of the ceiling"),
                full.request_rate() * 100.0 / ceiling.max(1.0),
            );
        }
        let capture_ended = Instant::now();
        let at_capture_end = events_stored(&ready(&client, &base).await);
        let drained_at = wait_drained(&client, &base).await;
        let after = ready(&client, &base).await;
        let written = events_stored(&after) - written_before;
        let e2e = drained_at.duration_since(load_start);
        let lead = after["sink"]["sink"]
            .as_str()
            .unwrap_or("the sink")
            .to_owned();
        println!(
            "{:<58} {:>10.0} events/s reached {lead} ({} events; sink caught up {:.2} s after capture ended)",
            format!("{label}, end to end"),
            written as f64 / e2e.as_secs_f64(),
            written,
            e2e.as_secs_f64() - full.elapsed.as_secs_f64()
        );
        // What the sink kept up with while capture ran: a sink slower than capture shows here
        // as a rate below the acknowledged one, however quickly it catches up afterwards.
        println!(
            "{:<58} {:>10.0} events/s reached {lead} during the load",
            format!("{label}, stored while capturing"),
            at_capture_end.saturating_sub(written_before) as f64 / full.elapsed.as_secs_f64(),
        );
        // Once capture is quiet the pipeline has the machine to itself: its own rate, and the
        // CPU the appliance spent per event, are the figures least moved by a noisy machine.
        let catch_up = drained_at.duration_since(capture_ended).as_secs_f64();
        if events_stored(&after) > at_capture_end && catch_up > 0.5 {
            println!(
                "{:<58} {:>10.0} events/s reached {lead} while catching up, capture idle",
                format!("{label}, pipeline alone"),
                (events_stored(&after) - at_capture_end) as f64 / catch_up,
            );
        }
        if let (Some(pid), Some(before)) = (pid, cpu_before) {
            println!(
                "{:<58} {:>10.1} µs of appliance CPU per event, capture to {lead}",
                format!("{label}, cost"),
                (cpu_seconds(pid) - before) * 1e6 / written.max(1) as f64,
            );
        }
        if sinks_before.len() > 1 {
            let followed_at = wait_followers(&client, &base).await;
            let after = stored_by(&ready(&client, &base).await);
            let e2e = followed_at.duration_since(load_start);
            for ((name, before), (_, now)) in sinks_before.iter().zip(&after).skip(1) {
                println!(
                    "{:<58} {:>10.0} events/s reached {name} (a follower; caught up {:.2} s after capture ended)",
                    format!("{label}, end to end"),
                    now.saturating_sub(*before) as f64 / e2e.as_secs_f64(),
                    e2e.as_secs_f64() - full.elapsed.as_secs_f64()
                );
            }
        }
        let half_measured = full.request_rate() / 2.0;
        let half_target = match shape {
            Shape::Single => TARGET_SINGLE_REQUESTS / 2.0,
            Shape::Batch(size) => TARGET_BATCH_EVENTS / 2.0 / size as f64,
        };
        for (what, rate) in [
            ("half of measured max", half_measured),
            ("half of target", half_target),
        ] {
            // The machine's own latency at this pace: what the bare server gives, beside it.
            if let Some(bare) = on_bare(Some(rate)).await {
                bare.print(&format!("{label}, {what}, ceiling"));
            }
            let paced = load(Some(rate)).await;
            paced.print(&format!("{label}, {what} ({rate:.0} req/s)"));
            wait_drained(&client, &base).await;
        }
    }
}

/// The CPU time `pid` has used (user and system), in seconds; 0 if it cannot be read.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The fields after the command (which may hold spaces) start after its closing bracket;
    // utime and stime are the 14th and 15th fields, in clock ticks.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Linux reports these in USER_HZ, 100 per second on every platform it runs on here.
    (ticks(11) + ticks(12)) / 100.0
}

/// The resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// RSS at rest (one plugin enabled, after ten quiet seconds), then the peak RSS while capturing
/// at a steady rate, sampled every 100 ms.
async fn memory(pid: u32, base: &str, args: &Args) {
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rest = rss_kib(pid);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };
    let batch = 50;
    let paced = run(
        base,
        &args.token,
        Shape::Batch(batch),
        args.events,
        args.connections,
        Duration::from_secs(args.duration),
        Some(args.memory_rate / batch as f64),
    )
    .await;
    wait_drained(&reqwest::Client::new(), base).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    paced.print(&format!(
        "batches of {batch} at {:.0} events/s, one plugin",
        args.memory_rate
    ));
    println!(
        "memory at rest, one plugin enabled: {:.0} MiB RSS",
        rest as f64 / 1024.0
    );
    println!(
        "memory while capturing {:.0} events/s: peak {:.0} MiB RSS (until the sink caught up)",
        args.memory_rate,
        peak as f64 / 1024.0
    );
}
