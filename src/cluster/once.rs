//! Scripts that run once per operation, however often their call is sent.
//!
//! A script's reply often decides who sends an event: `HSETNX started`
//! won → `stream_started`, the `ZADD` that created a client →
//! `client_connected`, the stop that ended a session → `stream_stopped`.
//! When Redis hangs (SIGSTOP, a long fork, a slow disk) a call times out on
//! our side while the command waits in Redis's socket buffer; Redis runs it
//! when it wakes up and the reply goes nowhere. Retrying then asks a
//! question whose answer already changed ("was the client new?" – no
//! longer), and the event is lost: found by the nemesis run, a Redis pause
//! longer than `node_ttl` lost a `stream_stopped`, so m3u-editor would count
//! that provider connection as busy forever.
//!
//! So each such operation carries an id, the same over its retries, and its
//! script stores its reply under `once:{id}` for a minute: whichever of the
//! sends runs first does the work, every later one gets the same reply.

use redis::Script;

/// How long a stored reply is kept: retries come within seconds of Redis
/// answering again (the original run happens when it wakes up too).
pub const REPLY_TTL_MS: u64 = 60_000;

/// Wraps a script body (which may use `local function`s and `return`s
/// anywhere) so that it takes one more ARGV, last: the `once:{id}` key.
/// An empty reply is not stored: it says the run changed nothing (a sweep
/// of a node that is alive, every second), so running again is harmless.
pub fn script(body: &str) -> Script {
    Script::new(&format!(
        "local once_key = table.remove(ARGV)\n\
         local stored = redis.call('GET', once_key)\n\
         if stored then return cjson.decode(stored) end\n\
         local function once_body()\n{body}\nend\n\
         local r = once_body()\n\
         if r == nil then r = false end\n\
         if type(r) == 'table' and next(r) == nil then return r end\n\
         redis.call('SET', once_key, cjson.encode(r), 'PX', {REPLY_TTL_MS})\n\
         return r\n"
    ))
}

/// The reply key (`once:{id}`) of a new operation, for all its sends.
pub fn new_key(keys: &super::Keys) -> String {
    keys.once(&uuid::Uuid::new_v4().simple().to_string())
}
