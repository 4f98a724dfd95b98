//! Lua scripts: the compare-and-set steps that must be atomic. Each one
//! touches only keys of one segment (one hash tag, so one cluster slot);
//! the version sets it reaches are named from a prefix passed in, which
//! Redis Cluster allows because they hash to the same slot.
//!
//! Stored overrides are `<order key><override JSON>`, the order key being
//! [`super::keys::order_key`] ([`ORDER_KEY_WIDTH`] bytes). Lua's `<` on strings follows the
//! server's locale, so `less` compares bytes, as Rust does.

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
-- Whether the override (order, id) is older than the stored one `cur`,
-- and the stored override decoded.
local function older_than_stored(order, id, cur)
  local cur_order = string.sub(cur, 1, W)
  local stored = cjson.decode(string.sub(cur, W + 1))
  return less(order, cur_order) or (order == cur_order and less(id, stored.id)), stored, cur_order
end
"#;

fn with_helpers(body: &str) -> Script {
    Script::new(&format!("local W = {ORDER_KEY_WIDTH}\n{LESS}\n{body}"))
}

/// KEYS: overrides, loaded, meta. ARGV: user, order key, id, op, stored
/// value, active version (0 = none), version key prefix.
///
/// Records the override unless the stored one is newer, then applies it to
/// the active version and to every newer version (being loaded, or sealed
/// with a snapshot before the override), so it survives the next rollover
/// whenever it arrives. A redelivery (same time and id) is not recorded
/// again but re-applied, which repairs a reverse index whose write was lost.
/// Returns `{recorded, include, versions applied...}`.
pub(crate) static RECORD_OVERRIDE: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r#"
local ov, loaded, meta = KEYS[1], KEYS[2], KEYS[3]
local user, order, id, op, value = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local active, prefix = tonumber(ARGV[6]), ARGV[7]
local recorded = 1
local cur = redis.call('HGET', ov, user)
if cur then
  local older, stored, cur_order = older_than_stored(order, id, cur)
  if cur_order == order and stored.id == id then
    recorded = 0
    op = stored.op
  elseif older then
    return {0}
  end
end
if recorded == 1 then redis.call('HSET', ov, user, value) end
local out = {recorded, op == 'include' and 1 or 0}
for _, v in ipairs(redis.call('SMEMBERS', loaded)) do
  local n = tonumber(v)
  local apply = n == active
  if not apply and n > active then
    apply = true
    local m = redis.call('HGET', meta, v)
    if m then
      local snapshot = cjson.decode(m).snapshotTime
      if type(snapshot) == 'string' and not less(snapshot, order) then apply = false end
    end
  end
  if apply then
    if op == 'include' then
      redis.call('SADD', prefix .. v, user)
    else
      redis.call('SREM', prefix .. v, user)
    end
    out[#out + 1] = n
  end
end
return out
"#,
    )
});

/// KEYS: overrides, version set, loaded. ARGV: version, then per override
/// user, order key, id, op.
///
/// Applies overrides to one version; where a newer override of the user
/// was recorded meanwhile (after the caller read its list), that one is
/// applied instead, so newest wins. Returns per override 1 (include) or 0.
pub(crate) static APPLY_OVERRIDES: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r#"
local ov, set, loaded = KEYS[1], KEYS[2], KEYS[3]
redis.call('SADD', loaded, ARGV[1])
local out = {}
for i = 2, #ARGV, 4 do
  local user, order, id, op = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local cur = redis.call('HGET', ov, user)
  if cur then
    local older, stored = older_than_stored(order, id, cur)
    if older then op = stored.op end
  end
  if op == 'include' then
    redis.call('SADD', set, user)
  else
    redis.call('SREM', set, user)
  end
  out[#out + 1] = op == 'include' and 1 or 0
end
return out
"#,
    )
});

/// KEYS: meta, version set, loaded. ARGV: version, metadata JSON without
/// the member count. Counts the members and writes the metadata last, in
/// one step, so a listed version is complete. Returns the count.
pub(crate) static SEAL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local meta, set, loaded = KEYS[1], KEYS[2], KEYS[3]
local n = redis.call('SCARD', set)
local rest = ARGV[2]
local json
if rest == '{}' then
  json = '{"members":' .. n .. '}'
else
  json = '{"members":' .. n .. ',' .. string.sub(rest, 2)
end
redis.call('SADD', loaded, ARGV[1])
redis.call('HSET', meta, ARGV[1], json)
return n
"#,
    )
});

/// KEYS: meta. ARGV: version key prefix. Every sealed version with its
/// metadata and its live member count (overrides change it after sealing).
/// Returns `{version, json, count, ...}`.
pub(crate) static VERSIONS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  out[#out + 1] = all[i]
  out[#out + 1] = all[i + 1]
  out[#out + 1] = redis.call('SCARD', ARGV[1] .. all[i])
end
return out
"#,
    )
});

/// KEYS: aliases. ARGV: segment field, version. Removes the alias only if
/// it still points at `version`, so a concurrent rollover is not undone.
pub(crate) static CLEAR_ALIAS_IF: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"#,
    )
});

/// KEYS: changes. ARGV: version, holder, now (ms), expiry (ms).
///
/// Claims publishing a version's change events: `{0}` when they were
/// published already, `{1}` while another holder's claim is live, else
/// `{2, version published last or 0}` and the claim is the caller's.
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
redis.call('HSET', key, 'claim', version .. ' ' .. expiry .. ' ' .. holder)
return {2, tonumber(published or '0')}
"#,
    )
});

/// KEYS: changes. ARGV: version, holder.
///
/// Marks the version's events published if the caller still holds the
/// claim; returns 1 then, 0 when the claim was lost.
pub(crate) static FINISH_CHANGES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local key, version, holder = KEYS[1], ARGV[1], ARGV[2]
local claim = redis.call('HGET', key, 'claim')
if not claim then return 0 end
local claimed, by = string.match(claim, '^(%d+) %d+ (.*)$')
if claimed ~= version or by ~= holder then return 0 end
redis.call('HSET', key, 'version', version)
redis.call('HDEL', key, 'claim')
return 1
"#,
    )
});
