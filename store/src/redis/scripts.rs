//! Lua scripts: the compare-and-set steps that must be atomic. Each one
//! touches only keys of one segment (one hash tag, so one cluster slot),
//! or one global hash.
//!
//! Stored overrides are `<order key><override JSON>`, the order key being
//! [`super::keys::order_key`] ([`ORDER_KEY_WIDTH`] bytes). Lua's `<` on strings follows the
//! server's locale, so `less` compares bytes, as Rust does. Overrides are
//! ordered as `Override::supersedes` orders them: time, then Kafka offset
//! (-1 when there is none, below every real offset), then id; the same
//! time and id is the same event.

use std::sync::LazyLock;

use redis::Script;

use super::keys::ORDER_KEY_WIDTH;

const LESS: &str = r#"
local function less(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
-- Whether the override (order, offset, id) is older than the stored one
-- `cur`, and whether it is the same event.
local function compare_with_stored(order, offset, id, cur)
  local cur_order = string.sub(cur, 1, W)
  local stored = cjson.decode(string.sub(cur, W + 1))
  local cur_offset = tonumber(stored.offset) or -1
  local older
  if order ~= cur_order then
    older = less(order, cur_order)
  elseif offset ~= cur_offset then
    older = offset < cur_offset
  else
    older = less(id, stored.id)
  end
  local same = order == cur_order and id == stored.id
  return older, same
end
"#;

fn with_helpers(body: &str) -> Script {
    Script::new(&format!("local W = {ORDER_KEY_WIDTH}\n{LESS}\n{body}"))
}

/// KEYS: overrides. ARGV: user, order key, offset (-1 = none), id, stored
/// value.
///
/// Records the override unless the stored one of the user is newer, or is
/// the same event (same time and id: a redelivery, or the producer's
/// duplicate at another offset). Returns 1 when it was recorded, else 0.
pub(crate) static RECORD_OVERRIDE: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r#"
local ov = KEYS[1]
local user, order, offset, id, value = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local cur = redis.call('HGET', ov, user)
if cur then
  local older, same = compare_with_stored(order, offset, id, cur)
  if same or older then return 0 end
end
redis.call('HSET', ov, user, value)
return 1
"#,
    )
});

/// KEYS: meta, fenced. ARGV: version, metadata JSON (with the member
/// count). Writes the metadata in one step, so a listed version is
/// complete. Returns 1, or -1 (nothing written) when the version was
/// deleted: a late seal cannot bring it back.
pub(crate) static SEAL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local meta, fenced = KEYS[1], KEYS[2]
if redis.call('SISMEMBER', fenced, ARGV[1]) == 1 then return -1 end
redis.call('HSET', meta, ARGV[1], ARGV[2])
return 1
"#,
    )
});

/// KEYS: meta, promoted. Every sealed version with its metadata (which
/// holds the member count recorded at sealing) and whether it was ever
/// promoted (1 or 0). Returns `{version, json, promoted, ...}`.
pub(crate) static VERSIONS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  out[#out + 1] = all[i]
  out[#out + 1] = all[i + 1]
  out[#out + 1] = redis.call('SISMEMBER', KEYS[2], all[i])
end
return out
"#,
    )
});

/// KEYS: changes. ARGV: version, holder, now (ms), expiry (ms), a new
/// incarnation id (kept only when the segment has none yet).
///
/// Claims publishing a version's change events: `{0}` when they were
/// published already, `{1}` while another holder's claim is live, else
/// `{2, version published last or 0, sequence, incarnation}` and the claim
/// is the caller's. The sequence counts finished announcements, so every
/// claim of one announcement gets the same one.
pub(crate) static CLAIM_CHANGES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local key, version, holder, now, expiry = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local published = redis.call('HGET', key, 'version')
if published == version then return {0} end
local claim = redis.call('HGET', key, 'claim')
if claim then
  local claimed, until_ms, by = string.match(claim, '^(%d+) (%d+) (.*)$')
  if claimed == version and by ~= holder and tonumber(until_ms) > now then return {1} end
end
local incarnation = redis.call('HGET', key, 'incarnation')
if not incarnation then
  incarnation = ARGV[5]
  redis.call('HSET', key, 'incarnation', incarnation)
end
local announced = tonumber(redis.call('HGET', key, 'announced') or '0')
redis.call('HSET', key, 'claim', version .. ' ' .. expiry .. ' ' .. holder)
return {2, tonumber(published or '0'), announced + 1, incarnation}
"#,
    )
});

/// KEYS: changes. ARGV: version, holder.
///
/// Marks the version's events published, and counts the announcement, if
/// the caller still holds the claim; returns 1 then, 0 when the claim was lost.
pub(crate) static FINISH_CHANGES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local key, version, holder = KEYS[1], ARGV[1], ARGV[2]
local claim = redis.call('HGET', key, 'claim')
if not claim then return 0 end
local claimed, by = string.match(claim, '^(%d+) %d+ (.*)$')
if claimed ~= version or by ~= holder then return 0 end
redis.call('HSET', key, 'version', version)
redis.call('HINCRBY', key, 'announced', 1)
redis.call('HDEL', key, 'claim')
return 1
"#,
    )
});

/// KEYS: a hash. ARGV: pairs of a field and the value read for it.
/// Removes each field whose value is still the one read, so that what was
/// written since is kept: the alias of a concurrent rollover, an override
/// recorded for the user meanwhile, a liveness the replica renewed, the
/// load request of a newer version. Returns how many went.
pub(crate) static HDEL_UNCHANGED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local removed = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    removed = removed + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return removed
"#,
    )
});
