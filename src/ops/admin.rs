//! The admin page's account: no default password. Until one is set, a one-time set-up token
//! (printed at start, or by `appliance admin setup-link`) lets the first visitor choose it.
//!
//! Owns: the password (an argon2id hash), the set-up token (kept as its sha256, with an
//! expiry), the session epoch (raised when the password changes or is reset, ending every
//! session) and the key that signs session cookies; all in the store's notes, so a backup
//! carries them.
//! Must never: keep a password or a set-up token in clear, or hash without the bound on the
//! password's length (argon2's cost is the point; an unbounded input is not).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{OpError, Ops};
use crate::jobs::now_ms;

/// How long a set-up link works.
pub const SETUP_VALIDITY_MS: i64 = 24 * 3600 * 1000;
/// Password length bounds, in characters.
pub const PASSWORD_MIN_CHARS: usize = 10;
pub const PASSWORD_MAX_CHARS: usize = 256;

const ACCOUNT_NOTE: &str = "admin_account";
const SETUP_NOTE: &str = "admin_setup";
const COOKIE_KEY_NOTE: &str = "admin_cookie_key";

#[derive(Serialize, Deserialize, Default)]
struct Account {
    /// argon2id PHC string; none until set-up.
    password_hash: Option<String>,
    /// Sessions carry the epoch they began in; raising it ends them all.
    epoch: u64,
}

#[derive(Serialize, Deserialize)]
struct SetupToken {
    sha256: String,
    expires_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct CookieKey {
    base64: String,
}

fn sha256_hex(text: &str) -> String {
    format!("{:x}", Sha256::digest(text.as_bytes()))
}

/// Whether `password` may be chosen.
pub fn check_new_password(password: &str) -> Result<(), OpError> {
    let chars = password.chars().count();
    if !(PASSWORD_MIN_CHARS..=PASSWORD_MAX_CHARS).contains(&chars) {
        return Err(OpError::Invalid(format!(
            "a password must be {PASSWORD_MIN_CHARS} to {PASSWORD_MAX_CHARS} characters long"
        )));
    }
    Ok(())
}

impl Ops {
    fn account(&self) -> Result<Account, OpError> {
        Ok(self.store.note(ACCOUNT_NOTE)?.unwrap_or_default())
    }

    /// Whether the admin password has been set.
    pub fn admin_exists(&self) -> Result<bool, OpError> {
        Ok(self.account()?.password_hash.is_some())
    }

    /// The current session epoch.
    pub fn session_epoch(&self) -> Result<u64, OpError> {
        Ok(self.account()?.epoch)
    }

    /// A new one-time set-up token, replacing any earlier one. With a password set it is
    /// refused unless `reset`, which removes the password and ends every session (for a
    /// forgotten password: whoever runs this is root or the service's user on the box).
    pub fn new_setup_token(&self, reset: bool) -> Result<String, OpError> {
        let mut account = self.account()?;
        if account.password_hash.is_some() {
            if !reset {
                return Err(OpError::Conflict(
                    "the admin password is already set; --reset removes it and ends every session"
                        .into(),
                ));
            }
            account.password_hash = None;
            account.epoch += 1;
            self.store.put_note(ACCOUNT_NOTE, &account)?;
        }
        let token = crate::store::random_token("setup_");
        self.store.put_note(
            SETUP_NOTE,
            &SetupToken {
                sha256: sha256_hex(&token),
                expires_ms: now_ms() + SETUP_VALIDITY_MS,
            },
        )?;
        Ok(token)
    }

    /// Whether `token` is the current, unexpired set-up token.
    pub fn setup_token_valid(&self, token: &str) -> Result<bool, OpError> {
        let stored: Option<SetupToken> = self.store.note(SETUP_NOTE)?;
        Ok(stored.is_some_and(|s| {
            s.expires_ms > now_ms()
                && constant_time_eq(s.sha256.as_bytes(), sha256_hex(token).as_bytes())
        }))
    }

    /// Sets the first password with the set-up token, which is used up; returns the session
    /// epoch to start a session in.
    pub fn complete_setup(&self, token: &str, password: &str) -> Result<u64, OpError> {
        if self.admin_exists()? {
            return Err(OpError::Conflict(
                "the admin password is already set; log in".into(),
            ));
        }
        if !self.setup_token_valid(token)? {
            return Err(OpError::Invalid(
                "this set-up link is not valid (used, replaced or expired); `appliance admin setup-link` prints a new one"
                    .into(),
            ));
        }
        check_new_password(password)?;
        let hash = hash_password(password)?;
        let mut account = self.account()?;
        account.password_hash = Some(hash);
        account.epoch += 1;
        self.store.put_note(ACCOUNT_NOTE, &account)?;
        // Used up: a second visit to the link finds nothing to match.
        self.store.put_note(
            SETUP_NOTE,
            &SetupToken {
                sha256: String::new(),
                expires_ms: 0,
            },
        )?;
        Ok(account.epoch)
    }

    /// The session epoch if `password` is the admin password.
    pub fn verify_admin_password(&self, password: &str) -> Result<Option<u64>, OpError> {
        let account = self.account()?;
        let Some(stored) = account.password_hash.as_deref() else {
            return Ok(None);
        };
        if password.chars().count() > PASSWORD_MAX_CHARS {
            return Ok(None);
        }
        let parsed = PasswordHash::new(stored)
            .map_err(|e| OpError::Internal(format!("the stored password hash: {e}")))?;
        let matches = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        Ok(matches.then_some(account.epoch))
    }

    /// The 64-byte key that signs session cookies, created on first use.
    pub fn cookie_key(&self) -> Result<Vec<u8>, OpError> {
        let engine = base64::engine::general_purpose::STANDARD;
        if let Some(CookieKey { base64 }) = self.store.note(COOKIE_KEY_NOTE)? {
            if let Ok(bytes) = engine.decode(base64) {
                if bytes.len() == 64 {
                    return Ok(bytes);
                }
            }
        }
        use rand::RngCore;
        let mut key = vec![0u8; 64];
        rand::rng().fill_bytes(&mut key);
        self.store.put_note(
            COOKIE_KEY_NOTE,
            &CookieKey {
                base64: engine.encode(&key),
            },
        )?;
        Ok(key)
    }
}

fn hash_password(password: &str) -> Result<String, OpError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| OpError::Internal(format!("hashing the password: {e}")))
}

/// Equality that takes as long whatever the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> (tempfile::TempDir, Ops) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let ops = Ops::remote(
            store,
            dir.path(),
            crate::config::Config::from_vars(Vec::new()).unwrap().jobs,
            crate::config::Config::from_vars(Vec::new())
                .unwrap()
                .plugin_limits,
        );
        (dir, ops)
    }

    #[test]
    fn a_setup_token_sets_the_password_once_and_a_reset_ends_sessions() {
        let (_dir, ops) = ops();
        assert!(!ops.admin_exists().unwrap());
        let first = ops.new_setup_token(false).unwrap();
        let token = ops.new_setup_token(false).unwrap();
        assert!(!ops.setup_token_valid(&first).unwrap(), "replaced");
        assert!(matches!(
            ops.complete_setup(&token, "short"),
            Err(OpError::Invalid(_))
        ));
        let epoch = ops
            .complete_setup(&token, "a long enough password")
            .unwrap();
        assert!(ops.admin_exists().unwrap());
        assert!(matches!(
            ops.complete_setup(&token, "another long password"),
            Err(OpError::Conflict(_))
        ));
        assert_eq!(
            ops.verify_admin_password("a long enough password").unwrap(),
            Some(epoch)
        );
        assert_eq!(ops.verify_admin_password("wrong password!").unwrap(), None);
        assert!(matches!(
            ops.new_setup_token(false),
            Err(OpError::Conflict(_))
        ));
        ops.new_setup_token(true).unwrap();
        assert!(!ops.admin_exists().unwrap());
        assert!(ops.session_epoch().unwrap() > epoch);
        assert_eq!(ops.cookie_key().unwrap(), ops.cookie_key().unwrap());
    }
}
