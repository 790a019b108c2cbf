//! The schedule lease (`SCHEDULE_LEASE=redis`): which box of a group runs the schedules, and
//! which slots have been handed to a box already.
//!
//! One Redis key holds the lease: the holder's identity (`NODE_ID` and its state file's id, so
//! two boxes given one name still exclude each other), set only if absent and renewed only
//! by its holder (a script compares and extends in one step), so it lapses `SCHEDULE_LOCK_TTL`
//! after its holder stops renewing it, and another box takes it. A hash records each schedule's
//! last claimed slot and the box that claimed it. A box claims a slot there before queueing it,
//! in a script that first checks that the box still holds the lease: a slot is queued by one
//! box only, a box that lost the lease claims nothing, and a box that takes over continues
//! after the last slot claimed by anyone.
//!
//! Owns: the lease and slot records in Redis. Must never: queue a job itself (the scheduler
//! does, after a claim), or claim a slot without holding the lease.

use std::time::Duration;

use tokio::sync::Mutex;

use crate::config::LeaseSettings;

/// The key that names the holder.
const LEASE_KEY: &str = "appliance:schedule:lease";
/// The hash of schedule name → `"{last claimed slot} {holder}"`.
const SLOTS_KEY: &str = "appliance:schedule:slots";
/// How long one Redis request may take before the tick counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Takes the lease if nobody holds it, or extends it if this box does. 1: held.
const HOLD: &str = r"
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Claims slot ARGV[3] of schedule ARGV[2] for box ARGV[1]. 1: claimed (or already claimed by
/// this box), 0: this or a later slot was claimed by another box, -1: the lease is not held.
const CLAIM: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local slot = tonumber(ARGV[3])
local current = redis.call('HGET', KEYS[2], ARGV[2])
if current then
  local space = string.find(current, ' ', 1, true)
  local last = tonumber(string.sub(current, 1, space - 1))
  local by = string.sub(current, space + 1)
  if last > slot or (last == slot and by ~= ARGV[1]) then
    return 0
  end
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3] .. ' ' .. ARGV[1])
return 1
";

/// Gives the lease up if this box holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// What became of a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    Granted,
    /// Another box claimed this slot or a later one.
    Taken,
    /// This box no longer holds the lease.
    LeaseLost,
}

/// A schedule's last claimed slot and the box that claimed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    pub slot: i64,
    pub holder: String,
}

pub struct RedisLease {
    client: redis::Client,
    connection: Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// `{NODE_ID}/{state file id}`: the same after a restart, another box's even under one name.
    holder: String,
    ttl: Duration,
}

impl RedisLease {
    /// The lease as `settings.node` of the state file `state` ([`crate::store::Store::state_id`]).
    pub fn new(
        settings: &LeaseSettings,
        state: uuid::Uuid,
    ) -> Result<RedisLease, redis::RedisError> {
        Ok(RedisLease {
            client: redis::Client::open(settings.redis_url.as_str())?,
            connection: Mutex::new(None),
            holder: format!("{}/{state}", settings.node),
            ttl: settings.ttl,
        })
    }

    /// Who this box is to the lease.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// A connection, made on first use and again after a failure.
    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, redis::RedisError> {
        let mut kept = self.connection.lock().await;
        if let Some(connection) = kept.as_ref() {
            return Ok(connection.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REQUEST_TIMEOUT))
            .set_response_timeout(Some(REQUEST_TIMEOUT));
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *kept = Some(connection.clone());
        Ok(connection)
    }

    /// Runs `command`; a failed connection is dropped so the next call makes a new one.
    async fn run<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
    ) -> Result<T, redis::RedisError> {
        let mut connection = self.connection().await?;
        let result = command.query_async(&mut connection).await;
        if result.is_err() {
            // Whatever went wrong, a new connection costs little next time.
            *self.connection.lock().await = None;
        }
        result
    }

    fn script(source: &str, keys: &[&str]) -> redis::Cmd {
        let mut command = redis::cmd("EVAL");
        command.arg(source).arg(keys.len()).arg(keys);
        command
    }

    /// Takes or renews the lease; true while this box holds it.
    pub async fn hold(&self) -> Result<bool, redis::RedisError> {
        let mut command = Self::script(HOLD, &[LEASE_KEY]);
        command.arg(&self.holder).arg(self.ttl.as_millis() as u64);
        Ok(self.run::<i64>(&command).await? == 1)
    }

    /// The last claimed slot of each schedule in `names`, in order.
    pub async fn claimed(
        &self,
        names: &[String],
    ) -> Result<Vec<Option<Claimed>>, redis::RedisError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut command = redis::cmd("HMGET");
        command.arg(SLOTS_KEY).arg(names);
        let values: Vec<Option<String>> = self.run(&command).await?;
        Ok(values
            .into_iter()
            .map(|value| {
                let (slot, holder) = value?
                    .split_once(' ')
                    .map(|(s, n)| (s.to_owned(), n.to_owned()))?;
                Some(Claimed {
                    slot: slot.parse().ok()?,
                    holder,
                })
            })
            .collect())
    }

    /// Claims `slot` of the schedule `name` for this box.
    pub async fn claim(&self, name: &str, slot: i64) -> Result<Claim, redis::RedisError> {
        let mut command = Self::script(CLAIM, &[LEASE_KEY, SLOTS_KEY]);
        command.arg(&self.holder).arg(name).arg(slot);
        Ok(match self.run::<i64>(&command).await? {
            1 => Claim::Granted,
            0 => Claim::Taken,
            _ => Claim::LeaseLost,
        })
    }

    /// Gives the lease up (at shutdown), so another box need not wait for it to lapse.
    pub async fn release(&self) -> Result<(), redis::RedisError> {
        let mut command = Self::script(RELEASE, &[LEASE_KEY]);
        command.arg(&self.holder);
        self.run::<i64>(&command).await.map(|_| ())
    }
}
