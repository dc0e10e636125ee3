//! The Lua scripts of the shared registry (streams, clients). Each API
//! write is one script, so two nodes answering at once can never interleave
//! half-done updates (the re-POST rule, a delete racing a join...).
//!
//! Every script takes the key prefix (`m3e:{<cluster>}:`) as ARGV[1] and
//! builds its keys from it: the keys it touches depend on stored data
//! (metadata sets, a stream's clients), and they all share one hash tag.
//! Times come from Redis (`TIME`), so node clocks never matter.
//!
//! Layout:
//! - `stream:{s}` HASH `spec` (StreamSpec JSON), `created`, `last_access` (ms),
//!   `bytes`, `segments` (every node's, added once a second); the owner's
//!   `detected`, `current_url`, `failover_index`, `failover_attempts`,
//!   `last_failover` (ms) (`crate::cluster::owner`)
//! - `streams` ZSET s → created ms; `meta:{f}:{v}` SET of s
//! - `clients:{s}` ZSET c → the latest hold (+inf while a socket is open)
//! - `client:{s}:{c}` HASH `s`, `c`, `info` (JSON ip/ua/username), `created`, `last`,
//!   and per holding node n: `h:n` (`inf` or expiry ms), `b:n` bytes, `g:n` segments
//! - `nclients:{n}` SET of `s\nc` the node holds; `cnodes` SET of nodes
//!   that hold clients (the dead-node sweep reads it: `nodes` forgets a
//!   dead node as soon as its session expires)
//! - outside the scripts: `webhooks` HASH url → `{hook, at}`, `hls_key`,
//!   `leader:expiry` (the node sweeping expired streams this round),
//!   `registry` (a token telling a deleted stream from a Redis that lost
//!   its data, `continuity.rs`)

use std::sync::LazyLock;

use redis::Script;

use crate::cluster::session::SETTLED_LUA;

/// Helpers shared by the scripts below.
const PRELUDE: &str = r#"
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function hold_alive(v, now)
  return v == 'inf' or (tonumber(v) or 0) > now
end
local function meta_of(spec)
  local ok, st = pcall(cjson.decode, spec)
  if ok and type(st) == 'table' and type(st['metadata']) == 'table' then
    return st['metadata']
  end
  return {}
end
local function index(id, spec, cmd)
  for f, v in pairs(meta_of(spec)) do
    redis.call(cmd, P .. 'meta:' .. f .. ':' .. tostring(v), id)
  end
end
-- The ZSET score of a client from its live holds; nil when none is left.
local function client_score(h, now)
  local best, inf = nil, false
  for i = 1, #h, 2 do
    local f, v = h[i], h[i + 1]
    if string.sub(f, 1, 2) == 'h:' and hold_alive(v, now) then
      if v == 'inf' then inf = true
      else
        local n = tonumber(v)
        if not best or n > best then best = n end
      end
    end
  end
  if inf then return '+inf' end
  return best
end
-- Removes a client whatever holds it; returns ZREM's answer and its hash.
local function drop_client(s, c)
  local ck = P .. 'client:' .. s .. ':' .. c
  local h = redis.call('HGETALL', ck)
  for i = 1, #h, 2 do
    if string.sub(h[i], 1, 2) == 'h:' then
      redis.call('SREM', P .. 'nclients:' .. string.sub(h[i], 3), s .. '\n' .. c)
    end
  end
  redis.call('DEL', ck)
  return redis.call('ZREM', P .. 'clients:' .. s, c), h
end
-- Deletes an API stream with its clients: {spec, {client hashes}} or nil.
local function drop_stream(id)
  local sk = P .. 'stream:' .. id
  local spec = redis.call('HGET', sk, 'spec')
  if not spec then return nil end
  index(id, spec, 'SREM')
  redis.call('DEL', sk)
  redis.call('ZREM', P .. 'streams', id)
  local gone = {}
  for _, c in ipairs(redis.call('ZRANGE', P .. 'clients:' .. id, 0, -1)) do
    local _, h = drop_client(id, c)
    table.insert(gone, h)
  end
  redis.call('DEL', P .. 'clients:' .. id)
  return {spec, gone}
end
local function live_clients(id, now)
  return redis.call('ZCOUNT', P .. 'clients:' .. id, now, '+inf')
end
"#;

/// POST /streams with the re-POST rule (API-COMPAT.md §8). ARGV: prefix,
/// id, spec JSON, max API streams (0: no cap). Returns {outcome, spec,
/// created}: `created`, `replaced` (no client anywhere: the request's spec
/// wins, created kept), `kept` (clients: unchanged), `same`; or {`full`}.
const REGISTER: &str = r#"
local id, spec, max = ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = now_ms()
local sk = P .. 'stream:' .. id
local old = redis.call('HGET', sk, 'spec')
if old then
  redis.call('HSET', sk, 'last_access', now)
  local created = redis.call('HGET', sk, 'created') or tostring(now)
  if old == spec then return {'same', old, created} end
  if live_clients(id, now) > 0 then return {'kept', old, created} end
  index(id, old, 'SREM')
  redis.call('HSET', sk, 'spec', spec)
  -- What an owner found and where it failed over to belong to the old spec.
  redis.call('HDEL', sk, 'detected', 'current_url', 'failover_index', 'failover_attempts', 'last_failover', 'ended_epoch')
  index(id, spec, 'SADD')
  return {'replaced', spec, created}
end
if max > 0 and redis.call('ZCARD', P .. 'streams') >= max then return {'full'} end
redis.call('HSET', sk, 'spec', spec, 'created', now, 'last_access', now)
redis.call('ZADD', P .. 'streams', now, id)
index(id, spec, 'SADD')
return {'created', spec, tostring(now)}
"#;

/// Streams with their live client counts. ARGV: prefix, mode, ...:
/// `all`; `meta` field value; `ids` id... (ids not in Redis come back with
/// an empty spec: YAML streams, whose clients are shared too). Returns a
/// flat list of {id, spec, created, last_access, clients, bytes, segments,
/// current_url, failover_index, failover_attempts, last_failover}.
const STREAMS: &str = r#"
local now = now_ms()
local ids
if ARGV[2] == 'all' then ids = redis.call('ZRANGE', P .. 'streams', 0, -1)
elseif ARGV[2] == 'meta' then ids = redis.call('SMEMBERS', P .. 'meta:' .. ARGV[3] .. ':' .. ARGV[4])
else ids = {} for i = 3, #ARGV do table.insert(ids, ARGV[i]) end end
local out = {}
for _, id in ipairs(ids) do
  local h = redis.call('HMGET', P .. 'stream:' .. id, 'spec', 'created', 'last_access', 'bytes', 'segments',
    'current_url', 'failover_index', 'failover_attempts', 'last_failover')
  if h[1] or ARGV[2] == 'ids' then
    table.insert(out, id)
    table.insert(out, h[1] or '')
    table.insert(out, h[2] or '0')
    table.insert(out, h[3] or '0')
    table.insert(out, tostring(live_clients(id, now)))
    table.insert(out, h[4] or '0')
    table.insert(out, h[5] or '0')
    for i = 6, 9 do table.insert(out, h[i] or '') end
  end
end
return out
"#;

/// GET /streams/counts-by-metadata for API streams: one round trip, no
/// specs shipped. ARGV: prefix, field, active only (1/0), value... Returns
/// one count per value, in order.
const COUNTS: &str = r#"
local field, active = ARGV[2], ARGV[3] == '1'
local now = now_ms()
local out = {}
for i = 4, #ARGV do
  local n = 0
  for _, id in ipairs(redis.call('SMEMBERS', P .. 'meta:' .. field .. ':' .. ARGV[i])) do
    local spec = redis.call('HGET', P .. 'stream:' .. id, 'spec')
    if spec and tostring(meta_of(spec)[field]) == ARGV[i] and (not active or live_clients(id, now) > 0) then
      n = n + 1
    end
  end
  table.insert(out, n)
end
return out
"#;

/// The totals `/health` shows, in O(clients): the streams with a client
/// come from the nodes' client sets. ARGV: prefix. Returns {API streams,
/// streams with a live client, live clients}.
const TOTALS: &str = r#"
local now = now_ms()
local seen = {}
local active, clients = 0, 0
for _, n in ipairs(redis.call('SMEMBERS', P .. 'cnodes')) do
  for _, m in ipairs(redis.call('SMEMBERS', P .. 'nclients:' .. n)) do
    local nl = string.find(m, '\n', 1, true)
    if nl then
      local s = string.sub(m, 1, nl - 1)
      if not seen[s] then
        seen[s] = true
        local k = live_clients(s, now)
        if k > 0 then active = active + 1 clients = clients + k end
      end
    end
  end
end
return {redis.call('ZCARD', P .. 'streams'), active, clients}
"#;

/// DELETE /streams/{id}. ARGV: prefix, id. Returns {spec, {client hashes}}
/// or {} when there was no such API stream.
const DELETE: &str = r#"
return drop_stream(ARGV[2]) or {}
"#;

/// DELETE /streams/by-metadata. ARGV: prefix, field, value, exclude
/// channel id (`\0` none), force (1/0), client id (`\0` none). Returns
/// {{id, spec, {client hashes}}...}, {{id, reason, active}...}, {dropped
/// client: zrem, hash}.
const DELETE_BY_METADATA: &str = r#"
local field, value, exclude, force, cid = ARGV[2], ARGV[3], ARGV[4], ARGV[5] == '1', ARGV[6]
local now = now_ms()
local deleted, skipped, dropped = {}, {}, {}
local ids = redis.call('SMEMBERS', P .. 'meta:' .. field .. ':' .. value)
table.sort(ids)
for _, id in ipairs(ids) do
  local spec = redis.call('HGET', P .. 'stream:' .. id, 'spec')
  if spec then
    local m = meta_of(spec)
    if tostring(m[field]) == value then
      if exclude ~= '\0' and m['id'] ~= nil and tostring(m['id']) == exclude then
        table.insert(skipped, {id, 'excluded_by_channel_id', '0'})
      else
        local keep = false
        if not force then
          if cid ~= '\0' then
            local r, h = drop_client(id, cid)
            if r == 1 then table.insert(dropped, {id, h}) end
          end
          local n = live_clients(id, now)
          if n > 0 then
            keep = true
            table.insert(skipped, {id, 'has_active_clients', tostring(n)})
          end
        end
        if not keep then
          local d = drop_stream(id)
          table.insert(deleted, {id, d[1], d[2]})
        end
      end
    end
  end
end
return {deleted, skipped, dropped}
"#;

/// DELETE /streams/oldest-by-metadata. ARGV: prefix, field, value, exclude
/// (`\0` none). Returns {id, created, spec, {client hashes}} or {}.
const DELETE_OLDEST: &str = r#"
local field, value, exclude = ARGV[2], ARGV[3], ARGV[4]
local best, best_created = nil, nil
for _, id in ipairs(redis.call('SMEMBERS', P .. 'meta:' .. field .. ':' .. value)) do
  local h = redis.call('HMGET', P .. 'stream:' .. id, 'spec', 'created')
  if h[1] then
    local m = meta_of(h[1])
    local excluded = exclude ~= '\0' and m['id'] ~= nil and tostring(m['id']) == exclude
    local created = tonumber(h[2]) or 0
    if tostring(m[field]) == value and not excluded then
      if not best or created < best_created or (created == best_created and id < best) then
        best, best_created = id, created
      end
    end
  end
end
if not best then return {} end
local d = drop_stream(best)
return {best, tostring(best_created), d[1], d[2]}
"#;

/// The expiry sweep: API streams with no live client whose last access is
/// older than the TTL. ARGV: prefix, ttl ms. Returns {{id, spec, {client
/// hashes}}...}.
const EXPIRE: &str = r#"
local ttl = tonumber(ARGV[2])
local now = now_ms()
local out = {}
for _, id in ipairs(redis.call('ZRANGE', P .. 'streams', 0, -1)) do
  local la = tonumber(redis.call('HGET', P .. 'stream:' .. id, 'last_access') or '0') or 0
  if now - la > ttl and live_clients(id, now) == 0 then
    local d = drop_stream(id)
    if d then table.insert(out, {id, d[1], d[2]}) end
  end
end
return out
"#;

/// Moves `last_access` of API streams used on this node and adds what it
/// served to their counters. ARGV: prefix, then per stream: id, touched
/// (1/0), bytes served since the last call, segments.
const TOUCH_STREAMS: &str = r#"
local now = now_ms()
for i = 2, #ARGV - 3, 4 do
  local sk = P .. 'stream:' .. ARGV[i]
  if redis.call('HEXISTS', sk, 'spec') == 1 then
    if ARGV[i + 1] == '1' then redis.call('HSET', sk, 'last_access', now) end
    if ARGV[i + 2] ~= '0' then redis.call('HINCRBY', sk, 'bytes', ARGV[i + 2]) end
    if ARGV[i + 3] ~= '0' then redis.call('HINCRBY', sk, 'segments', ARGV[i + 3]) end
  end
end
return 1
"#;

/// A client of this node appears (or is held again). ARGV: prefix, stream,
/// client, node, hold (`inf` or ms from now), info JSON. Returns {ZADD's
/// answer (1: new cluster-wide), live clients of the stream}.
const JOIN: &str = r#"
local s, c, n, hold = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now = now_ms()
local ck = P .. 'client:' .. s .. ':' .. c
if redis.call('EXISTS', ck) == 0 then
  redis.call('HSET', ck, 'info', ARGV[6], 'created', now, 's', s, 'c', c)
end
if hold ~= 'inf' then hold = tostring(now + tonumber(hold)) end
redis.call('HSET', ck, 'h:' .. n, hold, 'last', now)
redis.call('SADD', P .. 'nclients:' .. n, s .. '\n' .. c)
redis.call('SADD', P .. 'cnodes', n)
local score = client_score(redis.call('HGETALL', ck), now) or now
local added = redis.call('ZADD', P .. 'clients:' .. s, score, c)
return {added, live_clients(s, now)}
"#;

/// This node lets go of a client. ARGV: prefix, stream, client, node.
/// Returns {ZREM's answer (1: gone cluster-wide), its hash}, or {0} while
/// another node still holds it.
const LEAVE: &str = r#"
local s, c, n = ARGV[2], ARGV[3], ARGV[4]
local now = now_ms()
local ck = P .. 'client:' .. s .. ':' .. c
redis.call('SREM', P .. 'nclients:' .. n, s .. '\n' .. c)
if redis.call('EXISTS', ck) == 0 then return {0} end
redis.call('HDEL', ck, 'h:' .. n)
local score = client_score(redis.call('HGETALL', ck), now)
if score then
  redis.call('ZADD', P .. 'clients:' .. s, score, c)
  return {0}
end
local r, h = drop_client(s, c)
return {r, h}
"#;

/// Renews this node's holds and counters (at most once a second per
/// client). ARGV: prefix, node, then per client: stream, client, hold
/// (`inf` or ms from now), bytes, segments. Returns the positions (1-based)
/// of clients no longer in Redis (dropped, or swept while this node was
/// cut off): the caller joins them again.
const TOUCH_CLIENTS: &str = r#"
local n = ARGV[2]
local now = now_ms()
local missing = {}
local k = 0
for i = 3, #ARGV - 4, 5 do
  k = k + 1
  local s, c, hold = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local ck = P .. 'client:' .. s .. ':' .. c
  if redis.call('HEXISTS', ck, 'h:' .. n) == 1 then
    if hold ~= 'inf' then hold = tostring(now + tonumber(hold)) end
    redis.call('HSET', ck, 'h:' .. n, hold, 'b:' .. n, ARGV[i + 3], 'g:' .. n, ARGV[i + 4], 'last', now)
    local score = client_score(redis.call('HGETALL', ck), now)
    if score then redis.call('ZADD', P .. 'clients:' .. s, score, c) end
  else
    table.insert(missing, k)
  end
end
return missing
"#;

/// Drops a client whatever node holds it (the API). ARGV: prefix, stream,
/// client. Returns {ZREM's answer, its hash}.
const DROP_CLIENT: &str = r#"
local r, h = drop_client(ARGV[2], ARGV[3])
return {r, h}
"#;

/// Live clients: ARGV prefix, `all` | `stream` id. Returns their hashes. A hold `inf` counts only while its node's
/// session key lives, so a dead node's viewers leave the list at once.
const CLIENTS: &str = r#"
local now = now_ms()
local out = {}
local alive_node = {}
local function node_alive(n)
  if alive_node[n] == nil then alive_node[n] = redis.call('EXISTS', P .. 'node:' .. n) == 1 end
  return alive_node[n]
end
local function add(s, c)
  local h = redis.call('HGETALL', P .. 'client:' .. s .. ':' .. c)
  for i = 1, #h, 2 do
    local f, v = h[i], h[i + 1]
    if string.sub(f, 1, 2) == 'h:' and hold_alive(v, now) and (v ~= 'inf' or node_alive(string.sub(f, 3))) then
      table.insert(out, h)
      return
    end
  end
end
if ARGV[2] == 'stream' then
  for _, c in ipairs(redis.call('ZRANGEBYSCORE', P .. 'clients:' .. ARGV[3], now, '+inf')) do add(ARGV[3], c) end
else
  local seen = {}
  for _, n in ipairs(redis.call('SMEMBERS', P .. 'cnodes')) do
    for _, m in ipairs(redis.call('SMEMBERS', P .. 'nclients:' .. n)) do
      if not seen[m] then
        seen[m] = true
        local nl = string.find(m, '\n', 1, true)
        if nl then add(string.sub(m, 1, nl - 1), string.sub(m, nl + 1)) end
      end
    end
  end
end
return out
"#;

/// The dead-node sweep: a node in `cnodes` whose session key is gone loses
/// its holds. ARGV: prefix, node. Returns {{stream, client hash}...} of the
/// clients no other node holds (gone cluster-wide: one
/// `client_disconnected` each, from the node that ran this).
const SWEEP_NODE: &str = r#"
local n = ARGV[2]
if redis.call('EXISTS', P .. 'node:' .. n) == 1 then return {} end
local now = now_ms()
if not settled(P, now) then return {} end
local out = {}
for _, m in ipairs(redis.call('SMEMBERS', P .. 'nclients:' .. n)) do
  local nl = string.find(m, '\n', 1, true)
  if nl then
    local s, c = string.sub(m, 1, nl - 1), string.sub(m, nl + 1)
    local ck = P .. 'client:' .. s .. ':' .. c
    redis.call('HDEL', ck, 'h:' .. n)
    local h = redis.call('HGETALL', ck)
    local score = client_score(h, now)
    if score then
      redis.call('ZADD', P .. 'clients:' .. s, score, c)
    elseif #h > 0 then
      local r, hh = drop_client(s, c)
      if r == 1 then table.insert(out, {s, hh}) end
    else
      redis.call('ZREM', P .. 'clients:' .. s, c)
    end
  end
end
redis.call('DEL', P .. 'nclients:' .. n)
redis.call('SREM', P .. 'cnodes', n)
return out
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

pub static REGISTER_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(REGISTER));
pub static STREAMS_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(STREAMS));
pub static DELETE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(DELETE));
pub static TOTALS_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(TOTALS));
pub static COUNTS_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(COUNTS));
pub static DELETE_BY_METADATA_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(DELETE_BY_METADATA));
pub static DELETE_OLDEST_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(DELETE_OLDEST));
pub static EXPIRE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(EXPIRE));
pub static TOUCH_STREAMS_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(TOUCH_STREAMS));
/// Script runs whose reply decides who sends an event take one more
/// ARGV, last: their `once:{op}` key (`crate::cluster::once`).
fn script_once(body: &str) -> Script {
    crate::cluster::once::script(&format!("{PRELUDE}{SETTLED_LUA}{body}"))
}

pub static JOIN_SCRIPT: LazyLock<Script> = LazyLock::new(|| script_once(JOIN));
pub static LEAVE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script_once(LEAVE));
pub static TOUCH_CLIENTS_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(TOUCH_CLIENTS));
pub static DROP_CLIENT_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(DROP_CLIENT));
pub static CLIENTS_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(CLIENTS));
pub static SWEEP_NODE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script_once(SWEEP_NODE));
