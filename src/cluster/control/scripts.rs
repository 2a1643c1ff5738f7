//! The control plane's Lua scripts. Every script but `PRESENCE` names one key of the `{c}`
//! slot (`P:{c}:nodes`) and touches only keys of that slot, so a Redis Cluster runs it on the
//! master that holds them; `PRESENCE` touches only its channel's presence hash. Times come
//! from Redis's clock (`TIME`), so nodes whose clocks disagree still agree on leases; only a
//! connection's `connected_at` is the node's own, compared with the node's own clock.

/// Shared by the scripts of the `{c}` slot: ARGV[1] is the key prefix `P:{c}:`; `now` is
/// Redis's clock in ms; add and forget one connection of node `inst`, forget a whole node.
pub const PRELUDE: &str = r#"
local pre = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function add(inst, conn, value)
  local v = cjson.decode(value)
  local member = inst .. '.' .. conn
  redis.call('HSET', pre .. 'n:' .. inst, conn, value)
  redis.call('ZADD', pre .. 'u:' .. v[2], v[1], member)
  for _, p in ipairs(v[3]) do redis.call('SADD', pre .. 'p:' .. p, member) end
end
local function forget(inst, conn, value)
  local v = cjson.decode(value)
  local member = inst .. '.' .. conn
  redis.call('HDEL', pre .. 'n:' .. inst, conn)
  redis.call('ZREM', pre .. 'u:' .. v[2], member)
  redis.call('SREM', pre .. 'ev:' .. v[2], member)
  for _, p in ipairs(v[3]) do redis.call('SREM', pre .. 'p:' .. p, member) end
end
local function forget_node(inst, gone)
  local all = redis.call('HGETALL', pre .. 'n:' .. inst)
  for i = 1, #all, 2 do
    forget(inst, all[i], all[i + 1])
    gone[#gone + 1] = inst .. '.' .. all[i]
  end
  redis.call('DEL', pre .. 'n:' .. inst)
  redis.call('HDEL', pre .. 'nodes', inst)
end
"#;

/// ARGV: prefix, instance, conn, lease ms, value, per_user, close_oldest, per_project, cap,
/// ip_limit, ip. Answers {'ok', the member to close or '', forgotten members} or
/// {kind, detail, forgotten members}. A member told to close for a newer one stays counted
/// for its projects and the cap until it is gone, but not for its user (`ev:U`, a minute).
pub const ADMIT: &str = r#"
local inst, conn, lease = ARGV[2], ARGV[3], tonumber(ARGV[4])
local value, per_user, close_oldest = ARGV[5], tonumber(ARGV[6]), ARGV[7] == '1'
local per_project, cap, ip_limit = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local v = cjson.decode(value)
local gone = {}
local nodes = redis.call('HGETALL', pre .. 'nodes')
local live = {inst}
for i = 1, #nodes, 2 do
  if nodes[i] ~= inst then
    if tonumber(nodes[i + 1]) < now then
      forget_node(nodes[i], gone)
    else
      live[#live + 1] = nodes[i]
    end
  end
end
redis.call('HSET', pre .. 'nodes', inst, now + lease)
local member = inst .. '.' .. conn
if ip_limit > 0 then
  local key = pre .. 'ip:' .. ARGV[11]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - 60000)
  if redis.call('ZCARD', key) >= ip_limit then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    return {'ip', tostring(tonumber(oldest[2]) + 60000 - now), gone}
  end
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, 60000)
end
if cap > 0 then
  local total = 0
  for _, n in ipairs(live) do total = total + redis.call('HLEN', pre .. 'n:' .. n) end
  if total >= cap then return {'total', tostring(cap), gone} end
end
if per_project > 0 then
  for _, p in ipairs(v[3]) do
    if redis.call('SCARD', pre .. 'p:' .. p) >= per_project then return {'project', p, gone} end
  end
end
local evict = ''
if per_user > 0 then
  local key, evicting = pre .. 'u:' .. v[2], pre .. 'ev:' .. v[2]
  local counted = {}
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if redis.call('SISMEMBER', evicting, m) == 0 then counted[#counted + 1] = m end
  end
  if #counted >= per_user then
    if not close_oldest then return {'user', '', gone} end
    evict = counted[1]
    redis.call('SADD', evicting, evict)
    redis.call('PEXPIRE', evicting, 60000)
  end
end
add(inst, conn, value)
return {'ok', evict, gone}
"#;

/// ARGV: prefix, instance, conn.
pub const RELEASE: &str = r#"
local inst, conn = ARGV[2], ARGV[3]
local value = redis.call('HGET', pre .. 'n:' .. inst, conn)
if value then forget(inst, conn, value) end
return value and 1 or 0
"#;

/// ARGV: prefix, instance, lease ms, since, then (conn, value) pairs of every connection the
/// node holds. Entries the list lacks that are older than `since` (the node's clock) go.
/// Answers {added, removed, live nodes}.
pub const SYNC: &str = r#"
local inst, lease, since = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('HSET', pre .. 'nodes', inst, now + lease)
local live = {}
for i = 5, #ARGV, 2 do live[ARGV[i]] = ARGV[i + 1] end
local held = redis.call('HGETALL', pre .. 'n:' .. inst)
local have, added, removed = {}, 0, 0
for i = 1, #held, 2 do
  local conn, value = held[i], held[i + 1]
  have[conn] = true
  if not live[conn] and cjson.decode(value)[1] < since then
    forget(inst, conn, value)
    removed = removed + 1
  end
end
for conn, value in pairs(live) do
  if not have[conn] then
    add(inst, conn, value)
    added = added + 1
  end
end
local nodes, alive = redis.call('HGETALL', pre .. 'nodes'), 0
for i = 2, #nodes, 2 do
  if tonumber(nodes[i]) >= now then alive = alive + 1 end
end
return {added, removed, alive}
"#;

/// ARGV: prefix, instance, lease ms. Forgets what Redis holds of an earlier run of this node;
/// answers the members it held.
pub const RESET: &str = r#"
local gone = {}
forget_node(ARGV[2], gone)
redis.call('HSET', pre .. 'nodes', ARGV[2], now + tonumber(ARGV[3]))
return gone
"#;

/// ARGV: prefix. The live nodes, by Redis's clock.
pub const LIVE: &str = r#"
local nodes, live = redis.call('HGETALL', pre .. 'nodes'), {}
for i = 1, #nodes, 2 do
  if tonumber(nodes[i + 1]) >= now then live[#live + 1] = nodes[i] end
end
return live
"#;

/// ARGV: prefix, user, the value read, the new value ('' deletes). Answers {1, version} with
/// the changes' new version, or {0, the value in force} when another admin changed it in
/// between.
pub const STORE: &str = r#"
local key = pre .. 'ov'
local held = redis.call('HGET', key, ARGV[2]) or ''
if held ~= ARGV[3] then return {0, held} end
if ARGV[4] == '' then redis.call('HDEL', key, ARGV[2]) else redis.call('HSET', key, ARGV[2], ARGV[4]) end
return {1, tostring(redis.call('INCR', pre .. 'ov:v'))}
"#;

/// KEYS: the channel's presence hash. ARGV: instance, lease ms, joined count, then the joined
/// users and the left ones. Answers {joined, left} of the cluster: a user joins when no
/// other node has them on the channel, and leaves when no node has; a user whose only
/// entries ran out (their node is gone) leaves too. Joining a user already there only renews
/// their lease (the node's refresh does that).
pub const PRESENCE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key, inst, lease, n = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local elsewhere, expired = {}, {}
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local at = string.find(all[i], '|', 1, true)
  local node, user = string.sub(all[i], 1, at - 1), string.sub(all[i], at + 1)
  if tonumber(all[i + 1]) < now then
    redis.call('HDEL', key, all[i])
    expired[user] = true
  elseif node ~= inst then
    elsewhere[user] = true
  end
end
local joined, left, here = {}, {}, {}
for i = 4, 3 + n do
  local user = ARGV[i]
  here[user] = true
  local new = redis.call('HSET', key, inst .. '|' .. user, now + lease) == 1
  if new and not elsewhere[user] and not expired[user] then joined[#joined + 1] = user end
end
for i = 4 + n, #ARGV do
  local user = ARGV[i]
  if redis.call('HDEL', key, inst .. '|' .. user) == 1 and not elsewhere[user] then
    left[#left + 1] = user
    expired[user] = nil
  end
end
for user in pairs(expired) do
  if not elsewhere[user] and not here[user] then left[#left + 1] = user end
end
if redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, lease) end
return {joined, left}
"#;
