//! GeoIP: IP addresses located with a MaxMind DB file (GeoLite2 or GeoIP2 City, or DB-IP's City
//! Lite, which shares the layout), read into memory once and shared by every caller.
//!
//! Owns: finding and opening the database (`GEOIP_MMDB_PATH`, else `GeoLite2-City.mmdb` in the
//! data directory; `DISABLE_MMDB` turns it off), reloading it when the file is replaced, and
//! answering lookups with PostHog's GeoIP fields.
//! Must never: reach the network (the database is a file the operator provides and updates), or
//! fail a caller because there is no database: an address it cannot place is simply unknown,
//! and a missing or corrupt file means no GeoIP (one log line), never a stopped pipeline.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The database file looked for in the data directory when `GEOIP_MMDB_PATH` is not set.
pub const DEFAULT_FILE: &str = "GeoLite2-City.mmdb";

#[derive(Debug, thiserror::Error)]
#[error("cannot open the GeoIP database {path}: {detail}")]
pub struct GeoIpError {
    pub path: PathBuf,
    pub detail: String,
}

/// Where an address is, as far as the database knows: the fields of PostHog's GeoIP step.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Location {
    pub city_name: Option<String>,
    pub country_name: Option<String>,
    pub country_code: Option<String>,
    pub continent_name: Option<String>,
    pub continent_code: Option<String>,
    pub postal_code: Option<String>,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
    pub accuracy_radius: Option<u16>,
    pub time_zone: Option<String>,
    /// Largest first, as the database lists them (state, then county…).
    pub subdivisions: Vec<Subdivision>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Subdivision {
    pub code: Option<String>,
    pub name: Option<String>,
}

impl Location {
    /// The location as PostHog's property names without their `$geoip_` prefix, in PostHog's
    /// order; only the fields the database gave.
    pub fn properties(&self) -> Vec<(String, serde_json::Value)> {
        use serde_json::Value;
        let mut out = Vec::new();
        let mut text = |key: &str, value: &Option<String>| {
            if let Some(v) = value {
                out.push((key.to_owned(), Value::String(v.clone())));
            }
        };
        text("city_name", &self.city_name);
        text("country_name", &self.country_name);
        text("country_code", &self.country_code);
        text("continent_name", &self.continent_name);
        text("continent_code", &self.continent_code);
        text("postal_code", &self.postal_code);
        for (key, value) in [("latitude", self.latitude), ("longitude", self.longitude)] {
            if let Some(n) = value.and_then(serde_json::Number::from_f64) {
                out.push((key.to_owned(), Value::Number(n)));
            }
        }
        if let Some(radius) = self.accuracy_radius {
            out.push(("accuracy_radius".into(), Value::from(radius)));
        }
        if let Some(zone) = &self.time_zone {
            out.push(("time_zone".into(), Value::String(zone.clone())));
        }
        for (i, sub) in self.subdivisions.iter().enumerate() {
            let n = i + 1;
            if let Some(code) = &sub.code {
                out.push((format!("subdivision_{n}_code"), Value::String(code.clone())));
            }
            if let Some(name) = &sub.name {
                out.push((format!("subdivision_{n}_name"), Value::String(name.clone())));
            }
        }
        out
    }
}

/// The parts of a City record that are used, borrowed from the database.
#[derive(Deserialize)]
struct CityRecord<'a> {
    #[serde(borrow)]
    city: Option<Named<'a>>,
    #[serde(borrow)]
    country: Option<Coded<'a>>,
    #[serde(borrow)]
    continent: Option<Coded<'a>>,
    #[serde(borrow)]
    location: Option<Place<'a>>,
    #[serde(borrow)]
    postal: Option<Coded<'a>>,
    #[serde(borrow)]
    subdivisions: Option<Vec<Coded<'a>>>,
}

#[derive(Deserialize)]
struct Named<'a> {
    #[serde(borrow)]
    names: Option<BTreeMap<&'a str, &'a str>>,
}

#[derive(Deserialize)]
struct Coded<'a> {
    #[serde(borrow)]
    iso_code: Option<&'a str>,
    #[serde(borrow)]
    code: Option<&'a str>,
    #[serde(borrow)]
    names: Option<BTreeMap<&'a str, &'a str>>,
}

#[derive(Deserialize)]
struct Place<'a> {
    latitude: Option<f64>,
    longitude: Option<f64>,
    accuracy_radius: Option<u16>,
    #[serde(borrow)]
    time_zone: Option<&'a str>,
}

fn english(names: &Option<BTreeMap<&str, &str>>) -> Option<String> {
    names.as_ref()?.get("en").map(|n| n.to_string())
}

type Reader = maxminddb::Reader<Vec<u8>>;

/// The database, or none; reloaded when its file changes.
pub struct GeoIp {
    /// The file watched for changes (`None`: GeoIP is off).
    path: Option<PathBuf>,
    /// Whether the operator named the file (a missing default file is not worth a warning).
    explicit: bool,
    reader: RwLock<Option<Arc<Reader>>>,
    /// The file's modification time and size when last looked at (inner `None`: it was not
    /// there), to see a replacement; `None` before the first look.
    seen: Mutex<Option<Option<(SystemTime, u64)>>>,
}

impl GeoIp {
    /// No database: every address is unknown.
    pub fn disabled() -> GeoIp {
        GeoIp {
            path: None,
            explicit: false,
            reader: RwLock::new(None),
            seen: Mutex::new(None),
        }
    }

    /// Opens `path` now; an error if it cannot be read.
    pub fn open(path: &Path) -> Result<GeoIp, GeoIpError> {
        let geoip = GeoIp::watching(path.to_owned(), true);
        let reader = read(path)?;
        *geoip.reader.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(reader));
        *geoip.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(stamp(path));
        Ok(geoip)
    }

    fn watching(path: PathBuf, explicit: bool) -> GeoIp {
        GeoIp {
            path: Some(path),
            explicit,
            reader: RwLock::new(None),
            seen: Mutex::new(None),
        }
    }

    /// The database the configuration names (`GEOIP_MMDB_PATH`, else the default file in the
    /// data directory), loaded if it is there and readable; either way the file is watched
    /// ([`GeoIp::refresh`]).
    pub fn from_settings(disabled: bool, explicit: Option<&Path>, data_dir: &Path) -> GeoIp {
        if disabled {
            return GeoIp::disabled();
        }
        let geoip = match explicit {
            Some(path) => GeoIp::watching(path.to_owned(), true),
            None => GeoIp::watching(data_dir.join(DEFAULT_FILE), false),
        };
        geoip.refresh();
        geoip
    }

    /// Looks at the file: loads it if it is new or was replaced, drops the database if the file
    /// went away or cannot be read (one log line each time that changes).
    pub fn refresh(&self) {
        let Some(path) = &self.path else {
            return;
        };
        let now = stamp(path);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.as_ref() == Some(&now) {
            return;
        }
        let first = seen.is_none();
        *seen = Some(now);
        let next = match now {
            None => {
                if !first || self.explicit {
                    tracing::error!(path = %path.display(), "the GeoIP database is missing; events flow on without GeoIP");
                }
                None
            }
            Some(_) => match read(path) {
                Ok(reader) => {
                    tracing::info!(path = %path.display(), "GeoIP database loaded");
                    Some(Arc::new(reader))
                }
                Err(e) => {
                    tracing::error!(error = %e, "events flow on without GeoIP");
                    None
                }
            },
        };
        *self.reader.write().unwrap_or_else(|p| p.into_inner()) = next;
    }

    pub fn is_loaded(&self) -> bool {
        self.reader
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Whether there is a file to watch.
    pub fn is_enabled(&self) -> bool {
        self.path.is_some()
    }

    /// Where `ip` is; `None` if it is not an address, or the database does not place it.
    pub fn locate(&self, ip: &str) -> Option<Location> {
        let reader = self
            .reader
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let address: IpAddr = ip.trim().parse().ok()?;
        let found = reader.lookup(address).ok()?;
        let record: CityRecord = found.decode().ok()??;
        let code = |c: &Option<Coded>| {
            c.as_ref()
                .and_then(|c| c.iso_code.or(c.code).map(str::to_owned))
        };
        let location = Location {
            city_name: record.city.as_ref().and_then(|c| english(&c.names)),
            country_name: record.country.as_ref().and_then(|c| english(&c.names)),
            country_code: code(&record.country),
            continent_name: record.continent.as_ref().and_then(|c| english(&c.names)),
            continent_code: record
                .continent
                .as_ref()
                .and_then(|c| c.code.map(str::to_owned)),
            postal_code: record
                .postal
                .as_ref()
                .and_then(|p| p.code.map(str::to_owned)),
            latitude: record.location.as_ref().and_then(|l| l.latitude),
            longitude: record.location.as_ref().and_then(|l| l.longitude),
            accuracy_radius: record.location.as_ref().and_then(|l| l.accuracy_radius),
            time_zone: record
                .location
                .as_ref()
                .and_then(|l| l.time_zone.map(str::to_owned)),
            subdivisions: record
                .subdivisions
                .iter()
                .flatten()
                .map(|s| Subdivision {
                    code: s.iso_code.map(str::to_owned),
                    name: english(&s.names),
                })
                .collect(),
        };
        Some(location)
    }
}

fn read(path: &Path) -> Result<Reader, GeoIpError> {
    maxminddb::Reader::open_readfile(path).map_err(|e| GeoIpError {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}
