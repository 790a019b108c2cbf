//! More than one box: this box's name in a group (`NODE_ID`), the lease that lets one box of
//! the group run the schedules (`SCHEDULE_LEASE`, `SCHEDULE_LOCK_TTL`), and whether the boxes
//! share their persons through the Postgres sink (`SHARED_PERSONS`).

use std::time::Duration;

use super::{parse_bool, ConfigError, SinkKind};

/// The shortest schedule lease: it is renewed every second.
const MIN_LEASE_SECS: u64 = 2;
/// The longest `NODE_ID`.
const MAX_NODE_ID: usize = 64;

/// This box's place in a group of boxes.
#[derive(Clone, Debug, Default)]
pub struct ClusterSettings {
    /// `NODE_ID`: a sink shared by the group keeps this box's position under it.
    pub node: Option<String>,
    /// The schedule lease, when `SCHEDULE_LEASE` names a store.
    pub schedule_lease: Option<LeaseSettings>,
    /// `SHARED_PERSONS`: before each person step, persons other boxes moved on are read from
    /// the leading Postgres sink.
    pub shared_persons: bool,
}

/// Where the schedule lease is held, by whom and for how long.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub redis_url: String,
    pub node: String,
    /// `SCHEDULE_LOCK_TTL`: a holder that stops renewing loses the lease after this long.
    pub ttl: Duration,
}

/// Reads `NODE_ID`, `SCHEDULE_LEASE`, `SCHEDULE_LOCK_TTL` and `SHARED_PERSONS` (which needs
/// `lead`, the first sink, to be Postgres).
pub(super) fn cluster_settings(
    get: &dyn Fn(&str) -> String,
    explicit: &dyn Fn(&str) -> Option<String>,
    lead: Option<SinkKind>,
) -> Result<ClusterSettings, ConfigError> {
    let node = explicit("NODE_ID").map(|n| n.trim().to_owned());
    if let Some(node) = &node {
        let fits = node.len() <= MAX_NODE_ID
            && node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !fits {
            return Err(ConfigError {
                name: "NODE_ID",
                value: node.clone(),
                allowed: format!(
                    "letters, digits, '.', '_' and '-', at most {MAX_NODE_ID} characters"
                ),
            });
        }
    }
    let schedule_lease = match get("SCHEDULE_LEASE").trim().to_ascii_lowercase().as_str() {
        "redis" => {
            let refuse = |allowed: &str| ConfigError {
                name: "SCHEDULE_LEASE",
                value: get("SCHEDULE_LEASE"),
                allowed: allowed.into(),
            };
            let redis_url = explicit("REDIS_URL")
                .ok_or_else(|| refuse("redis only with REDIS_URL set (the lease is kept there)"))?;
            let node = node.clone().ok_or_else(|| {
                refuse("redis only with NODE_ID set (each box holds the lease under its own name)")
            })?;
            let ttl: u64 = get("SCHEDULE_LOCK_TTL").parse().unwrap_or(60);
            if ttl < MIN_LEASE_SECS {
                return Err(ConfigError {
                    name: "SCHEDULE_LOCK_TTL",
                    value: ttl.to_string(),
                    allowed: format!(
                        "at least {MIN_LEASE_SECS} with SCHEDULE_LEASE=redis (the holder renews \
                         the lease every second; a shorter one would lapse between renewals)"
                    ),
                });
            }
            Some(LeaseSettings {
                redis_url,
                node,
                ttl: Duration::from_secs(ttl),
            })
        }
        _ => None,
    };
    let shared_persons = parse_bool(&get("SHARED_PERSONS")).unwrap_or(false);
    if shared_persons && lead != Some(SinkKind::Postgres) {
        return Err(ConfigError {
            name: "SHARED_PERSONS",
            value: get("SHARED_PERSONS"),
            allowed: "true only when postgres is the first sink in SINKS (the boxes' shared \
                      person store is PostHog's posthog_person in DATABASE_URL)"
                .into(),
        });
    }
    Ok(ClusterSettings {
        node,
        schedule_lease,
        shared_persons,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn config(vars: &[(&str, &str)]) -> Result<Config, String> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_lease_needs_redis_a_node_id_and_a_ttl_it_can_renew() {
        let lease = [("SCHEDULE_LEASE", "redis")];
        assert!(config(&lease).unwrap_err().contains("REDIS_URL"));
        let with_redis = [lease[0], ("REDIS_URL", "redis://r")];
        assert!(config(&with_redis).unwrap_err().contains("NODE_ID"));
        let named = [with_redis[0], with_redis[1], ("NODE_ID", "box-1")];
        let settings = config(&named).unwrap().cluster.schedule_lease.unwrap();
        assert_eq!(
            (settings.node.as_str(), settings.ttl.as_secs()),
            ("box-1", 60)
        );
        let short = [named[0], named[1], named[2], ("SCHEDULE_LOCK_TTL", "1")];
        assert!(config(&short).unwrap_err().contains("SCHEDULE_LOCK_TTL"));
        assert!(config(&[("NODE_ID", "a b")])
            .unwrap_err()
            .contains("NODE_ID"));
        assert!(config(&[]).unwrap().cluster.schedule_lease.is_none());
    }

    #[test]
    fn shared_persons_need_postgres_to_lead() {
        let shared = ("SHARED_PERSONS", "true");
        let url = ("DATABASE_URL", "postgres://u@db/analytics");
        assert!(config(&[shared]).unwrap_err().contains("SHARED_PERSONS"));
        let following = [shared, url, ("SINKS", "sqlite,postgres")];
        assert!(config(&following).unwrap_err().contains("first sink"));
        let leading = [shared, url, ("SINKS", "postgres")];
        assert!(config(&leading).unwrap().cluster.shared_persons);
        assert!(!config(&[url]).unwrap().cluster.shared_persons);
    }
}
