//! More than one box: this box's name in a group (`NODE_ID`), and the lease that lets one box
//! of the group run the schedules (`SCHEDULE_LEASE`, `SCHEDULE_LOCK_TTL`).

use std::time::Duration;

use super::ConfigError;

/// The longest `NODE_ID`.
const MAX_NODE_ID: usize = 64;

/// This box's place in a group of boxes.
#[derive(Clone, Debug, Default)]
pub struct ClusterSettings {
    /// `NODE_ID`: a sink shared by the group keeps this box's position under it.
    pub node: Option<String>,
    /// The schedule lease, when `SCHEDULE_LEASE` names a store.
    pub schedule_lease: Option<LeaseSettings>,
}

/// Where the schedule lease is held, by whom and for how long.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub redis_url: String,
    pub node: String,
    /// `SCHEDULE_LOCK_TTL`: a holder that stops renewing loses the lease after this long.
    pub ttl: Duration,
}

/// Reads `NODE_ID`, `SCHEDULE_LEASE` and `SCHEDULE_LOCK_TTL`.
pub(super) fn cluster_settings(
    get: &dyn Fn(&str) -> String,
    explicit: &dyn Fn(&str) -> Option<String>,
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
            Some(LeaseSettings {
                redis_url,
                node,
                ttl: Duration::from_secs(get("SCHEDULE_LOCK_TTL").parse().unwrap_or(60)),
            })
        }
        _ => None,
    };
    Ok(ClusterSettings {
        node,
        schedule_lease,
    })
}
