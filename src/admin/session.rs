//! Admin sessions: a signed cookie (`HttpOnly`, `SameSite=Strict`, `Secure` behind HTTPS) that
//! the admin page sets at log-in and `/api/` accepts beside the API token; and the CSRF token
//! every form (and every cookie-authenticated API call that changes something) must carry.
//!
//! Owns: the cookie's shape (`epoch:expires:nonce`, signed with the key from `ops::admin`), its
//! checks (signature, expiry, the account's epoch) and the CSRF token derived from it.
//! Must never: accept a session from an older epoch (a password reset ends them all), or a
//! changing request whose CSRF token does not match its session.

use axum::http::HeaderMap;
use axum_extra::extract::cookie::{Cookie, Key, SameSite, SignedCookieJar};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::jobs::now_ms;
use crate::ops::admin::constant_time_eq;
use crate::ops::{OpError, Ops};

/// The cookie's name.
pub const COOKIE: &str = "appliance_session";
/// How long a session lasts.
pub const SESSION_MS: i64 = 12 * 3600 * 1000;
/// The header a cookie-authenticated API call carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Signs and checks session cookies.
#[derive(Clone)]
pub struct Sessions {
    key: Key,
    raw_key: Vec<u8>,
}

/// A checked session.
#[derive(Clone, Debug)]
pub struct Session {
    nonce: String,
    csrf: String,
}

impl Session {
    /// The token forms of this session carry.
    pub fn csrf(&self) -> &str {
        &self.csrf
    }

    /// Whether `given` is this session's CSRF token.
    pub fn csrf_matches(&self, given: &str) -> bool {
        constant_time_eq(given.as_bytes(), self.csrf.as_bytes())
    }

    pub fn id(&self) -> &str {
        &self.nonce
    }
}

impl Sessions {
    /// Sessions signed with the store's cookie key (created on first use).
    pub fn load(ops: &Ops) -> Result<Sessions, OpError> {
        let raw_key = ops.cookie_key()?;
        Ok(Sessions {
            key: Key::from(&raw_key),
            raw_key,
        })
    }

    fn csrf_for(&self, nonce: &str) -> String {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.raw_key) {
            Ok(mac) => mac,
            // HMAC takes a key of any length; this arm is never taken.
            Err(_) => return String::new(),
        };
        mac.update(b"csrf:");
        mac.update(nonce.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The cookie jar (answered with the response) that starts a session in `epoch`.
    pub fn start(&self, epoch: u64, secure: bool) -> SignedCookieJar {
        let mut nonce = [0u8; 16];
        rand::rng().fill_bytes(&mut nonce);
        let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
        let value = format!("{epoch}:{}:{nonce}", now_ms() + SESSION_MS);
        SignedCookieJar::new(self.key.clone()).add(self.cookie(value, secure))
    }

    /// The cookie jar that ends the session in the browser.
    pub fn end(&self, secure: bool) -> SignedCookieJar {
        SignedCookieJar::new(self.key.clone()).remove(self.cookie(String::new(), secure))
    }

    fn cookie(&self, value: String, secure: bool) -> Cookie<'static> {
        Cookie::build((COOKIE, value))
            .http_only(true)
            .same_site(SameSite::Strict)
            .secure(secure)
            .path("/")
            .build()
    }

    /// The request's session, if its cookie is signed by us, unexpired and of `epoch`.
    pub fn check(&self, headers: &HeaderMap, epoch: u64) -> Option<Session> {
        let jar = SignedCookieJar::from_headers(headers, self.key.clone());
        let value = jar.get(COOKIE)?.value().to_owned();
        let mut parts = value.splitn(3, ':');
        let session_epoch: u64 = parts.next()?.parse().ok()?;
        let expires: i64 = parts.next()?.parse().ok()?;
        let nonce = parts.next()?.to_owned();
        if session_epoch != epoch || expires <= now_ms() {
            return None;
        }
        Some(Session {
            csrf: self.csrf_for(&nonce),
            nonce,
        })
    }
}

/// Whether the request reached us over HTTPS (through a proxy that says so).
pub fn is_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}
