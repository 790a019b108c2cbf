//! GeoIP: IP addresses located with a MaxMind DB file (GeoLite2 or GeoIP2 City, or DB-IP's City
//! Lite, which shares the layout), read into memory once and shared by every caller.
//!
//! Owns: finding and opening the database (`GEOIP_MMDB_PATH`, else `GeoLite2-City.mmdb` in the
//! data directory; `DISABLE_MMDB` turns it off) and answering lookups.
//! Must never: reach the network (the database is a file the operator provides and updates), or
//! fail a caller because there is no database: an address it cannot place is simply unknown.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The database file looked for in the data directory when `GEOIP_MMDB_PATH` is not set.
pub const DEFAULT_FILE: &str = "GeoLite2-City.mmdb";

#[derive(Debug, thiserror::Error)]
#[error("cannot open the GeoIP database {path}: {detail}")]
pub struct GeoIpError {
    pub path: PathBuf,
    pub detail: String,
}

/// Where an address is, as far as the database knows.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Location {
    pub country_code: Option<String>,
    pub country_name: Option<String>,
    pub city_name: Option<String>,
    pub subdivision_code: Option<String>,
    pub postal_code: Option<String>,
    pub continent_code: Option<String>,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
    pub time_zone: Option<String>,
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
    #[serde(borrow)]
    time_zone: Option<&'a str>,
}

fn english(names: &Option<BTreeMap<&str, &str>>) -> Option<String> {
    names.as_ref()?.get("en").map(|n| n.to_string())
}

/// The database, or none.
pub struct GeoIp {
    reader: Option<maxminddb::Reader<Vec<u8>>>,
}

impl GeoIp {
    /// No database: every address is unknown.
    pub fn disabled() -> GeoIp {
        GeoIp { reader: None }
    }

    pub fn open(path: &Path) -> Result<GeoIp, GeoIpError> {
        let reader = maxminddb::Reader::open_readfile(path).map_err(|e| GeoIpError {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        Ok(GeoIp {
            reader: Some(reader),
        })
    }

    /// The database the configuration names. A file named explicitly must open; the default
    /// file is used only if it is there.
    pub fn from_settings(
        disabled: bool,
        explicit: Option<&Path>,
        data_dir: &Path,
    ) -> Result<GeoIp, GeoIpError> {
        if disabled {
            return Ok(GeoIp::disabled());
        }
        match explicit {
            Some(path) => GeoIp::open(path),
            None => {
                let default = data_dir.join(DEFAULT_FILE);
                if default.exists() {
                    GeoIp::open(&default)
                } else {
                    Ok(GeoIp::disabled())
                }
            }
        }
    }

    pub fn is_loaded(&self) -> bool {
        self.reader.is_some()
    }

    /// Where `ip` is; `None` if it is not an address, or the database does not place it.
    pub fn locate(&self, ip: &str) -> Option<Location> {
        let reader = self.reader.as_ref()?;
        let address: IpAddr = ip.trim().parse().ok()?;
        let found = reader.lookup(address).ok()?;
        let record: CityRecord = found.decode().ok()??;
        let location = Location {
            country_code: record
                .country
                .as_ref()
                .and_then(|c| c.iso_code.map(str::to_owned)),
            country_name: record.country.as_ref().and_then(|c| english(&c.names)),
            city_name: record.city.as_ref().and_then(|c| english(&c.names)),
            subdivision_code: record
                .subdivisions
                .as_ref()
                .and_then(|s| s.first())
                .and_then(|s| s.iso_code.map(str::to_owned)),
            postal_code: record
                .postal
                .as_ref()
                .and_then(|p| p.code.map(str::to_owned)),
            continent_code: record
                .continent
                .as_ref()
                .and_then(|c| c.code.map(str::to_owned)),
            latitude: record.location.as_ref().and_then(|l| l.latitude),
            longitude: record.location.as_ref().and_then(|l| l.longitude),
            time_zone: record
                .location
                .as_ref()
                .and_then(|l| l.time_zone.map(str::to_owned)),
        };
        Some(location)
    }
}
