//! The atomic Redis scripts: take a lease, give unused units back. Each touches one
//! key, so they run unchanged on Redis Cluster.

use std::sync::LazyLock;

use redis::Script;

use super::schema::{REFILLED_AT, REMAINING, REVISION, TAT};

/// Takes up to `want` credits and at least `need` (else none), after applying the refill
/// due and restarting the count when its revision changed.
///
/// KEYS[1] the credits hash. ARGV: want, need, revision, seed remaining, refill amount
/// (-1: none), refill due at (the Unix second of the latest refill time, -1: none),
/// share (a grant is at most a 1/share of what is left, and at least `need`), idle
/// expiry in seconds. Returns `{granted, left, refilled_at}`, `refilled_at` as stored
/// (another instance may have applied a later refill); `granted` below `need` is a
/// refusal.
pub(super) static TAKE_CREDITS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local want, need = tonumber(ARGV[1]), tonumber(ARGV[2])
local due = tonumber(ARGV[6])
local rem = redis.call('HGET', KEYS[1], '{REMAINING}')
if rem == false or redis.call('HGET', KEYS[1], '{REVISION}') ~= ARGV[3] then
  rem = tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], '{REMAINING}', rem, '{REVISION}', ARGV[3], '{REFILLED_AT}', due)
else
  rem = tonumber(rem)
  if due >= 0 and tonumber(redis.call('HGET', KEYS[1], '{REFILLED_AT}') or '-1') < due then
    rem = tonumber(ARGV[5])
    redis.call('HSET', KEYS[1], '{REMAINING}', rem, '{REFILLED_AT}', due)
  end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[8]))
local at = tonumber(redis.call('HGET', KEYS[1], '{REFILLED_AT}') or '-1')
if rem < need then return {{0, rem, at}} end
local grant = math.min(want, math.max(need, math.floor(rem / tonumber(ARGV[7]))))
if grant > 0 then redis.call('HINCRBY', KEYS[1], '{REMAINING}', -grant) end
return {{grant, rem - grant, at}}
"#
    ))
});

/// Gives back `units` credits of a lease taken under `revision` after the refill of
/// `refilled_at`; a lease from before a refill or a reseed is void, and nothing is
/// added.
///
/// KEYS[1] the credits hash. ARGV: units, revision, refilled_at. Returns 1 if added.
pub(super) static GIVE_CREDITS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
if redis.call('HGET', KEYS[1], '{REVISION}') ~= ARGV[2] then return 0 end
if tonumber(redis.call('HGET', KEYS[1], '{REFILLED_AT}') or '-1') ~= tonumber(ARGV[3]) then return 0 end
redis.call('HINCRBY', KEYS[1], '{REMAINING}', tonumber(ARGV[1]))
return 1
"#
    ))
});

/// Debits `units` spent while Redis was down from a count of `revision`, never below 0.
/// A count Redis does not hold yet (the key was first used while Redis was away) is
/// seeded first, and a refill due is applied first, as a take would: else the take
/// that seeds or refills it later would drop the debit.
///
/// KEYS[1] the credits hash. ARGV: units, revision, seed remaining, refill amount (-1:
/// none), refill due at (-1: none), idle expiry in seconds. Returns what is left (-1:
/// another revision's count, nothing debited).
pub(super) static DEBIT_CREDITS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local due = tonumber(ARGV[5])
local rem = redis.call('HGET', KEYS[1], '{REMAINING}')
if rem == false then
  rem = tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], '{REVISION}', ARGV[2], '{REFILLED_AT}', due)
elseif redis.call('HGET', KEYS[1], '{REVISION}') ~= ARGV[2] then
  return -1
else
  rem = tonumber(rem)
  if due >= 0 and tonumber(redis.call('HGET', KEYS[1], '{REFILLED_AT}') or '-1') < due then
    rem = tonumber(ARGV[4])
    redis.call('HSET', KEYS[1], '{REFILLED_AT}', due)
  end
end
rem = math.max(0, rem - tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], '{REMAINING}', rem)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
return rem
"#
    ))
});

/// Takes up to `want` units of a GCRA limit, at least `need` (else none), on Redis's
/// own clock, so instances' clocks do not matter.
///
/// KEYS[1] the limit hash. ARGV: want, need, emission interval in µs (period / limit),
/// burst. Returns `{granted, left, wait_us}`: `left` what the limit still holds after
/// the grant, `wait_us` (on a refusal) how long until `need` units are there.
pub(super) static TAKE_LIMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local want, need = tonumber(ARGV[1]), tonumber(ARGV[2])
local t, burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('HGET', KEYS[1], '{TAT}') or '0')
if tat < now then tat = now end
local avail = math.floor((now + burst * t - tat) / t)
if avail < need then return {{0, avail, tat + need * t - burst * t - now}} end
local grant = math.min(want, avail)
tat = tat + grant * t
redis.call('HSET', KEYS[1], '{TAT}', tat)
redis.call('PEXPIREAT', KEYS[1], math.floor(tat / 1000) + 1000)
return {{grant, avail - grant, 0}}
"#
    ))
});

/// Gives back `units` of a GCRA limit (a lease's unspent part, a refunded request).
///
/// KEYS[1] the limit hash. ARGV: units, emission interval in µs.
pub(super) static GIVE_LIMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local tat = tonumber(redis.call('HGET', KEYS[1], '{TAT}') or '0')
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
tat = math.max(now, tat - tonumber(ARGV[1]) * tonumber(ARGV[2]))
if tat > now then redis.call('HSET', KEYS[1], '{TAT}', tat) else redis.call('DEL', KEYS[1]) end
return 1
"#
    ))
});
