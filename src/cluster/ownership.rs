//! Channel ownership: one lease per stream in `own:{s}` with a fencing
//! epoch (CLUSTER.md "Ownership"). A recorded owner whose session key no
//! longer holds its session is dead, and the next taker gets a new epoch.
//! Scripts run atomically in Redis, so two nodes racing for a channel get
//! one `Mine` and one `Theirs`.

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::LazyLock;

use redis::Script;

use super::{Cluster, ClusterError};

/// An `own:{s}` key outlives a crashed owner's channel by at most this
/// (owners refresh it while they hold the channel).
const SAFETY_TTL: Duration = Duration::from_secs(24 * 3600);

/// KEYS: own, epoch. ARGV: key prefix, node, session, addr, kind, safety ms.
const TAKE: &str = r#"
local o = redis.call('HMGET', KEYS[1], 'node', 'session', 'epoch', 'addr', 'kind')
if o[1] then
  if o[1] == ARGV[2] and o[2] == ARGV[3] then
    return {'1', o[1], o[2], o[3], o[4], o[5]}
  end
  local cur = redis.call('GET', ARGV[1] .. 'node:' .. o[1])
  if cur and cur == o[2] then
    return {'0', o[1], o[2], o[3], o[4], o[5]}
  end
end
local mine = redis.call('GET', ARGV[1] .. 'node:' .. ARGV[2])
if mine ~= ARGV[3] then return {'-1'} end
local e = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'node', ARGV[2], 'session', ARGV[3], 'epoch', e, 'addr', ARGV[4], 'kind', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {'1', ARGV[2], ARGV[3], tostring(e), ARGV[4], ARGV[5]}
"#;

/// KEYS: own. ARGV: session, epoch, safety ms (0: delete).
const CHECK_OR_RELEASE: &str = r#"
local o = redis.call('HMGET', KEYS[1], 'session', 'epoch')
if o[1] ~= ARGV[1] or o[2] ~= ARGV[2] then return 0 end
if ARGV[3] == '0' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
"#;

/// KEYS: own. ARGV: key prefix.
const CURRENT: &str = r#"
local o = redis.call('HMGET', KEYS[1], 'node', 'session', 'epoch', 'addr', 'kind')
if not o[1] then return {} end
local cur = redis.call('GET', ARGV[1] .. 'node:' .. o[1])
if cur ~= o[2] then return {} end
return {o[1], o[2], o[3], o[4], o[5]}
"#;

static TAKE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(TAKE));
static CHECK_OR_RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CHECK_OR_RELEASE));
static CURRENT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CURRENT));

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub node: String,
    pub session: String,
    /// The fencing token: relay requests and the owner's writes carry it.
    pub epoch: u64,
    /// The owner's internal listener (`cluster.advertise`).
    pub addr: SocketAddr,
    /// What is owned: `live`, `hls`...
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// This node owns the stream now (or already did).
    Mine(Owner),
    /// A live node owns it.
    Theirs(Owner),
}

fn owner(fields: &[String]) -> Result<Owner, ClusterError> {
    let bad = || ClusterError::Protocol(format!("unexpected ownership record {fields:?}"));
    let [node, session, epoch, addr, kind] = fields else {
        return Err(bad());
    };
    Ok(Owner {
        node: node.clone(),
        session: session.clone(),
        epoch: epoch.parse().map_err(|_| bad())?,
        addr: addr.parse().map_err(|_| bad())?,
        kind: kind.clone(),
    })
}

/// Takes `stream` for this node unless a live node holds it. Refused while
/// this node has under 1 s of session left: it must not open a provider
/// connection it may have to give up before it could close it.
pub async fn take(c: &Cluster, stream: &str, kind: &str) -> Result<Take, ClusterError> {
    if c.session_left() < super::session::FENCE_MARGIN {
        return Err(ClusterError::Fenced);
    }
    let reply: Vec<String> = c
        .run(
            TAKE_SCRIPT
                .key(c.keys.own(stream))
                .key(c.keys.epoch())
                .arg(c.keys.prefix())
                .arg(c.node_id())
                .arg(c.session())
                .arg(c.advertise().to_string())
                .arg(kind)
                .arg(SAFETY_TTL.as_millis() as u64)
                .invoke_async(&mut c.conn.clone()),
        )
        .await?;
    match reply.split_first() {
        Some((flag, rest)) if flag == "1" => Ok(Take::Mine(owner(rest)?)),
        Some((flag, rest)) if flag == "0" => Ok(Take::Theirs(owner(rest)?)),
        Some((flag, _)) if flag == "-1" => Err(ClusterError::Fenced),
        _ => Err(ClusterError::Protocol(format!(
            "unexpected take reply {reply:?}"
        ))),
    }
}

async fn check_or_release(
    c: &Cluster,
    stream: &str,
    epoch: u64,
    ttl_ms: u64,
) -> Result<bool, ClusterError> {
    let n: i64 = c
        .run(
            CHECK_OR_RELEASE_SCRIPT
                .key(c.keys.own(stream))
                .arg(c.session())
                .arg(epoch)
                .arg(ttl_ms)
                .invoke_async(&mut c.conn.clone()),
        )
        .await?;
    Ok(n == 1)
}

/// Gives `stream` up if this node still holds it at `epoch`.
pub async fn release(c: &Cluster, stream: &str, epoch: u64) -> Result<bool, ClusterError> {
    check_or_release(c, stream, epoch, 0).await
}

/// Whether this node still owns `stream` at `epoch` (and keeps the record
/// from expiring). Owners ask every second and yield on `false`.
pub async fn still_mine(c: &Cluster, stream: &str, epoch: u64) -> Result<bool, ClusterError> {
    check_or_release(c, stream, epoch, SAFETY_TTL.as_millis() as u64).await
}

/// The live owner of `stream`, if any.
pub async fn current(c: &Cluster, stream: &str) -> Result<Option<Owner>, ClusterError> {
    let reply: Vec<String> = c
        .run(
            CURRENT_SCRIPT
                .key(c.keys.own(stream))
                .arg(c.keys.prefix())
                .invoke_async(&mut c.conn.clone()),
        )
        .await?;
    if reply.is_empty() {
        return Ok(None);
    }
    owner(&reply).map(Some)
}
