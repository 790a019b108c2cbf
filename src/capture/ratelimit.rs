//! Optional rate limits on capture: requests per client address (`CAPTURE_RATE_LIMIT_PER_IP`)
//! and events per project token (`CAPTURE_RATE_LIMIT_PER_TOKEN`), with governor's GCRA limiters.
//! A request over either is answered 429 with the seconds to wait in `Retry-After`.
//!
//! The limiters keep one small state per key; keys that have been quiet long enough to be back
//! at full allowance are dropped when the map grows past [`MAX_KEYS`], so a flood of new
//! addresses costs a bounded amount of memory. IPv6 addresses count by their /64, the block one
//! client usually holds.

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::error::CaptureError;

/// Keys kept before quiet ones are dropped.
const MAX_KEYS: usize = 100_000;

pub struct RateLimits {
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_token: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

fn limiter<K: Clone + std::hash::Hash + Eq>(per_second: u32) -> Option<DefaultKeyedRateLimiter<K>> {
    NonZeroU32::new(per_second).map(|n| RateLimiter::keyed(Quota::per_second(n)))
}

/// The key an address is limited by: itself for IPv4, its /64 for IPv6.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            IpAddr::from([
                segments[0],
                segments[1],
                segments[2],
                segments[3],
                0,
                0,
                0,
                0,
            ])
        }
    }
}

impl RateLimits {
    /// Limits of `per_ip` requests and `per_token` events per second; 0 turns one off.
    pub fn new(per_ip: u32, per_token: u32) -> RateLimits {
        RateLimits {
            per_ip: limiter(per_ip),
            per_token: limiter(per_token),
            clock: DefaultClock::default(),
        }
    }

    /// One more request from `ip`.
    pub fn check_request(&self, ip: IpAddr) -> Result<(), CaptureError> {
        let Some(limiter) = &self.per_ip else {
            return Ok(());
        };
        if limiter.len() > MAX_KEYS {
            limiter.retain_recent();
        }
        limiter
            .check_key(&client_key(ip))
            .map_err(|not_until| self.refusal("requests from this address", not_until))
    }

    /// `events` more events for the (known) project `token`.
    pub fn check_events(&self, token: &str, events: usize) -> Result<(), CaptureError> {
        let Some(limiter) = &self.per_token else {
            return Ok(());
        };
        let Some(n) = NonZeroU32::new(events.min(u32::MAX as usize) as u32) else {
            return Ok(());
        };
        if limiter.len() > MAX_KEYS {
            limiter.retain_recent();
        }
        match limiter.check_key_n(&token.to_owned(), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(self.refusal("events for this project token", not_until)),
            // More events in one request than a whole second allows: never admissible as one.
            Err(_) => Err(CaptureError::RateLimited {
                what: "events in one request for this project token's rate limit",
                retry_after: 1,
            }),
        }
    }

    fn refusal(
        &self,
        what: &'static str,
        not_until: governor::NotUntil<<DefaultClock as Clock>::Instant>,
    ) -> CaptureError {
        let wait = not_until.wait_time_from(self.clock.now());
        CaptureError::RateLimited {
            what,
            retry_after: wait.as_secs_f64().ceil().max(1.0) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_apply_per_address_and_per_token() {
        let limits = RateLimits::new(2, 10);
        let a: IpAddr = "203.0.113.1".parse().unwrap();
        let b: IpAddr = "203.0.113.2".parse().unwrap();
        assert!(limits.check_request(a).is_ok());
        assert!(limits.check_request(a).is_ok());
        let refused = limits.check_request(a).unwrap_err();
        assert!(matches!(
            refused,
            CaptureError::RateLimited { retry_after: 1, .. }
        ));
        assert!(
            limits.check_request(b).is_ok(),
            "another address has its own allowance"
        );
        // Two addresses of one IPv6 /64 share one allowance.
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::2".parse().unwrap();
        assert!(limits.check_request(v6a).is_ok());
        assert!(limits.check_request(v6b).is_ok());
        assert!(limits.check_request(v6a).is_err());
        assert!(limits.check_events("phc_a", 8).is_ok());
        assert!(limits.check_events("phc_a", 8).is_err());
        assert!(limits.check_events("phc_b", 8).is_ok());
        assert!(
            limits.check_events("phc_b", 11).is_err(),
            "larger than a second's allowance"
        );
        let off = RateLimits::new(0, 0);
        for _ in 0..100 {
            assert!(off.check_request(a).is_ok());
            assert!(off.check_events("phc_a", 1000).is_ok());
        }
    }
}
