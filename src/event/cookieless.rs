//! PostHog's cookieless server hash: an event sent with `$cookieless_mode` and the sentinel
//! distinct id `$posthog_cookieless` gets a distinct id derived, on the server, from the
//! visitor's IP, user agent and site, keyed by a salt that changes every day, so one visitor is
//! one distinct id for a day and nothing identifying is stored.
//!
//! Follows PostHog's `rust/common/cookieless` (`do_hash`, `hash_to_distinct_id`): SipHash-2-4
//! (128 bits) keyed by the day's 16-byte salt over `"{team}-{ip}-{root domain}-{user agent}-{n}-
//! {extra}"`, the bytes reordered as PostHog does, then `cookieless_` and unpadded base64. The
//! appliance runs PostHog's stateless mode (`n` is 0: no per-visitor identify counter) and does
//! not synthesise session ids.

use chrono::NaiveDate;
use serde_json::{Map, Value};
use siphasher::sip128::{Hasher128, SipHasher24};
use std::hash::Hasher;

pub const SENTINEL: &str = "$posthog_cookieless";
const MODE_PROPERTY: &str = "$cookieless_mode";
const EXTRA_PROPERTY: &str = "$cookieless_extra";
const HOST_PROPERTY: &str = "$host";
const USER_AGENT_PROPERTY: &str = "$raw_user_agent";

/// Every property the hash reads.
pub const PROPERTIES_READ: [&str; 4] = [
    MODE_PROPERTY,
    EXTRA_PROPERTY,
    HOST_PROPERTY,
    USER_AGENT_PROPERTY,
];

/// The daily salts (kept by the caller: the same day must give the same salt everywhere).
pub trait Salts {
    fn salt(&self, day: NaiveDate) -> Option<[u8; 16]>;
}

/// Whether the event asks for a server-side distinct id.
pub fn wanted(distinct_id: &str, properties: &Map<String, Value>) -> bool {
    distinct_id == SENTINEL && properties.get(MODE_PROPERTY) == Some(&Value::Bool(true))
}

/// The distinct id PostHog's server hash gives; `None` when the event lacks what it needs (its
/// IP, `$host`, `$raw_user_agent`) or no salt is available.
pub fn distinct_id(
    salts: &dyn Salts,
    team: u64,
    day: NaiveDate,
    ip: &str,
    properties: &Map<String, Value>,
) -> Option<String> {
    let text = |key: &str| {
        properties
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let host = text(HOST_PROPERTY)?;
    let user_agent = text(USER_AGENT_PROPERTY)?;
    let extra: String = text(EXTRA_PROPERTY)
        .unwrap_or_default()
        .chars()
        .take(100)
        .collect();
    let salt = salts.salt(day)?;
    let hash = hash(&salt, team, ip, &root_domain(host), user_agent, 0, &extra);
    use base64::Engine;
    Some(format!(
        "cookieless_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(hash)
    ))
}

/// The site a host belongs to, as PostHog keys visitors (`https://test.example.co.uk/foo` →
/// `example.co.uk`): the registrable domain with the port if one is given, an address as it is
/// (IPv6 in brackets), and `localhost` as `127.0.0.1`.
fn root_domain(host: &str) -> String {
    let host = host.trim();
    if host.is_empty() {
        return String::new();
    }
    let with_scheme = if host.contains("://") {
        host.to_owned()
    } else if let Ok(v6) = host.parse::<std::net::Ipv6Addr>() {
        format!("http://[{v6}]")
    } else {
        format!("http://{host}")
    };
    let Ok(url) = url::Url::parse(&with_scheme) else {
        return host.to_owned();
    };
    let name = match url.host() {
        Some(url::Host::Domain("localhost")) => "127.0.0.1".to_owned(),
        Some(url::Host::Domain(domain)) => psl::domain_str(domain).unwrap_or(domain).to_owned(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        None => return host.to_owned(),
    };
    match url.port() {
        Some(port) => format!("{name}:{port}"),
        None => name,
    }
}

fn hash(
    salt: &[u8; 16],
    team: u64,
    ip: &str,
    root_domain: &str,
    user_agent: &str,
    n: u64,
    extra: &str,
) -> [u8; 16] {
    let mut key0 = [0u8; 8];
    let mut key1 = [0u8; 8];
    key0.copy_from_slice(&salt[..8]);
    key1.copy_from_slice(&salt[8..]);
    let mut hasher = SipHasher24::new_with_keys(u64::from_le_bytes(key0), u64::from_le_bytes(key1));
    hasher.write(format!("{team}-{ip}-{root_domain}-{user_agent}-{n}-{extra}").as_bytes());
    let value = hasher.finish128();
    let (h1, h2) = (value.h1.to_le_bytes(), value.h2.to_le_bytes());
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&h2[4..]);
    out[4..8].copy_from_slice(&h2[..4]);
    out[8..12].copy_from_slice(&h1[4..]);
    out[12..].copy_from_slice(&h1[..4]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Fixed;
    impl Salts for Fixed {
        fn salt(&self, day: NaiveDate) -> Option<[u8; 16]> {
            Some([chrono::Datelike::day(&day) as u8; 16])
        }
    }

    fn props(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn hashes_and_root_domains_match_posthogs_test_cases() {
        // From PostHog's rust/common/cookieless/src/test_cases.json.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt: [u8; 16] = b64
            .decode("AQIDBAUGBwgJCgsMDQ4PEA==")
            .unwrap()
            .try_into()
            .unwrap();
        let ua = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/58.0.3029.110 Safari/537.3";
        for (team, ip, domain, n, expected) in [
            (1, "1.2.3.4", "example.com", 0, "jZfBjkLcdjlQTVmIKIhC3Q=="),
            (
                3000,
                "1.2.3.4",
                "example.com",
                0,
                "BiC9Zpcr2Ctyc6mvZh4+lg==",
            ),
            (1, "1.2.3.4", "other.com", 0, "HSTgvTovdKSCZxOWE0fiOA=="),
            (1, "1.2.3.4", "example.com", 1, "igaaEDUIUxmCqAaPyFWP7Q=="),
        ] {
            assert_eq!(
                b64.encode(hash(&salt, team, ip, domain, ua, n, "")),
                expected
            );
        }
        for (host, expected) in [
            ("https://test.example.com/foo", "example.com"),
            ("https://test.example.co.uk/foo", "example.co.uk"),
            ("http://localhost:3000", "127.0.0.1:3000"),
            ("1.2.3.4:5000", "1.2.3.4:5000"),
            ("sub.example.co.uk:8080", "example.co.uk:8080"),
            ("http://example.com:8000", "example.com:8000"),
            ("https://user:pass@example.com", "example.com"),
            (
                "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
                "[2001:db8:85a3::8a2e:370:7334]",
            ),
            ("[::1]:8080", "[::1]:8080"),
            ("localhost", "127.0.0.1"),
        ] {
            assert_eq!(root_domain(host), expected, "{host}");
        }
    }

    #[test]
    fn one_visitor_is_one_id_per_day_and_site() {
        let day = NaiveDate::from_ymd_opt(2026, 12, 2).unwrap();
        let p = props(json!({"$host": "www.shop.example.co.uk", "$raw_user_agent": "Firefox"}));
        let a = distinct_id(&Fixed, 1, day, "203.0.113.7", &p).unwrap();
        assert!(a.starts_with("cookieless_") && !a.ends_with('='), "{a}");
        let other_subdomain =
            props(json!({"$host": "blog.example.co.uk", "$raw_user_agent": "Firefox"}));
        assert_eq!(
            distinct_id(&Fixed, 1, day, "203.0.113.7", &other_subdomain).unwrap(),
            a
        );
        assert_ne!(distinct_id(&Fixed, 1, day, "203.0.113.8", &p).unwrap(), a);
        assert_ne!(distinct_id(&Fixed, 2, day, "203.0.113.7", &p).unwrap(), a);
        let tomorrow = day.succ_opt().unwrap();
        assert_ne!(
            distinct_id(&Fixed, 1, tomorrow, "203.0.113.7", &p).unwrap(),
            a
        );
        assert!(distinct_id(
            &Fixed,
            1,
            day,
            "203.0.113.7",
            &props(json!({"$host": "x.com"}))
        )
        .is_none());
    }
}
