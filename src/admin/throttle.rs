//! Throttling of failed authentication (a wrong API token, a wrong admin password) per client
//! address.
//!
//! Owns: the allowance per address and the lockouts, both bounded in memory.
//! Must never: grow with the number of addresses past [`MAX_LOCKED`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Instant;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Wrong tokens or passwords an address may send per minute; one more locks it out (429, the
/// credential not even looked at) until its allowance comes back.
const AUTH_FAILURES_PER_MINUTE: u32 = 10;
/// Addresses remembered as locked out at most; the oldest lockouts go first.
const MAX_LOCKED: usize = 10_000;

/// Throttles failed authentication per client address.
pub(crate) struct FailedAuth {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    locked: Mutex<HashMap<IpAddr, Instant>>,
}

impl FailedAuth {
    pub(crate) fn new() -> FailedAuth {
        let per_minute = NonZeroU32::new(AUTH_FAILURES_PER_MINUTE).unwrap_or(NonZeroU32::MIN);
        FailedAuth {
            limiter: RateLimiter::keyed(Quota::per_minute(per_minute)),
            locked: Mutex::default(),
        }
    }

    /// When `ip` may try again, if it is locked out now.
    pub(crate) fn locked_until(&self, ip: IpAddr) -> Option<Instant> {
        let locked = self.locked.lock().unwrap_or_else(|p| p.into_inner());
        locked
            .get(&ip)
            .copied()
            .filter(|until| *until > Instant::now())
    }

    /// Counts a failure from `ip`; past the allowance the address is locked out.
    pub(crate) fn failed(&self, ip: IpAddr) {
        if self.limiter.len() > MAX_LOCKED {
            self.limiter.retain_recent();
        }
        if let Err(not_until) = self.limiter.check_key(&ip) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let mut locked = self.locked.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            locked.retain(|_, until| *until > now);
            if locked.len() < MAX_LOCKED {
                locked.insert(ip, now + wait);
            }
        }
    }
}
