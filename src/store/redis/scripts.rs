//! The Lua scripts of claims (commit, takeover, release), the in-flight values they compare,
//! and the checks of their replies.

use redis::Value;

use super::error::unexpected;
use crate::store::{Claimed, StoreError, Token};

/// Marks a key done if it is free, or held (in flight or done) by this claim's token, with one
/// command per key: `SET key done GET KEEPTTL` answers what the key held, and keeps its expiry
/// (the claim's ttl + lease). The usual answer is the claim's whole in-flight value, for which
/// nothing more is done. A key that was free (it now has no expiry) or held by this token with
/// another ttl gets the commit's ttl (`PEXPIRE`). If the key held another claim's value, the
/// script puts it back, with the same expiry, before anything else can run (Redis runs a
/// script alone), so no client ever sees the change. A key that is not a string is refused and
/// left alone (`SET … GET` fails before it writes).
///
/// KEYS = the keys; ARGV[1] = ttl in ms, then runs of (count, in-flight value for this ttl,
/// done value) that cover the keys in order (the keys of one claim batch share a token).
/// Returns how many keys it went through, then the positions (1-based) of those it refused,
/// usually none: an answer per key cost Redis a table entry and the client a parsed reply
/// each.
pub(super) const COMMIT_SCRIPT: &str = r"
local ttl = ARGV[1]
local refused = {0}
local i, a = 1, 2
while a < #ARGV do
  local last, whole, done = i + tonumber(ARGV[a]) - 1, ARGV[a + 1], ARGV[a + 2]
  local mine = string.sub(whole, 1, 17)
  for j = i, last do
    local key = KEYS[j]
    local held = redis.pcall('SET', key, done, 'GET', 'KEEPTTL')
    if held == whole or held == done then
    elseif type(held) == 'table' then
      refused[#refused + 1] = j
    elseif not held or string.sub(held, 1, 17) == mine then
      redis.call('PEXPIRE', key, ttl)
    else
      redis.call('SET', key, held, 'KEEPTTL')
      refused[#refused + 1] = j
    end
  end
  i, a = last + 1, a + 3
end
refused[1] = i - 1
return refused
";

/// Takes the keys whose lease ran out, for a claim that found them in flight: a key in flight
/// holds its claim's ttl after the 17-byte prefix, and its lease is over once no more than
/// that ttl is left of its expiry (`PTTL`, Redis's clock). A value whose ttl cannot be read
/// is left to its own expiry.
///
/// KEYS = the keys; ARGV = this claim's in-flight value, its expiry in ms. Answers per key:
/// 1 = taken (or already this claim's), 2 = in flight under a running lease, 3 = done.
pub(super) const TAKEOVER_SCRIPT: &str = r"
local value, px = ARGV[1], ARGV[2]
local mine = string.sub(value, 1, 17)
local answers = {}
for j = 1, #KEYS do
  local key = KEYS[j]
  local held = redis.pcall('GET', key)
  local answer = 2
  if not held then
    redis.call('SET', key, value, 'PX', px)
    answer = 1
  elseif type(held) == 'table' then
    answer = 2
  elseif string.sub(held, 1, 17) == mine then
    answer = 1
  elseif #held >= 17 and string.byte(held, 1) == 99 then
    local keep = string.sub(held, 18)
    if #keep <= 15 and string.match(keep, '^%d+$') then
      local left = redis.call('PTTL', key)
      if left < 0 or left <= tonumber(keep) then
        redis.call('SET', key, value, 'PX', px)
        answer = 1
      end
    end
  else
    answer = 3
  end
  answers[j] = answer
end
return answers
";

/// Frees keys that these claims still hold in flight. KEYS = the keys; ARGV = runs of (count,
/// in-flight prefix) that cover the keys in order. Returns how many were freed.
pub(super) const RELEASE_SCRIPT: &str = r"
local freed = 0
local i, a = 1, 1
while a < #ARGV do
  local last, mine = i + tonumber(ARGV[a]) - 1, ARGV[a + 1]
  for j = i, last do
    local held = redis.call('GET', KEYS[j])
    if held and string.sub(held, 1, 17) == mine then
      freed = freed + redis.call('DEL', KEYS[j])
    end
  end
  i, a = last + 1, a + 2
end
return freed
";

/// Takes back keys that a token still holds: a done or inserted key holds the token itself, a
/// key in flight `c` + the token + its ttl. Any other value, or a key that is not a string, is
/// left alone.
///
/// KEYS = the keys; ARGV = runs of (count, token) that cover the keys in order. Returns how
/// many keys it deleted.
pub(super) const TAKE_BACK_SCRIPT: &str = r"
local taken = 0
local i, a = 1, 1
while a < #ARGV do
  local last, token = i + tonumber(ARGV[a]) - 1, ARGV[a + 1]
  local flight = 'c' .. token
  for j = i, last do
    local held = redis.pcall('GET', KEYS[j])
    if type(held) == 'string' and (held == token or string.sub(held, 1, 17) == flight) then
      taken = taken + redis.call('DEL', KEYS[j])
    end
  end
  i, a = last + 1, a + 2
end
return taken
";

/// Renews the leases of keys a claim still holds in flight: a key whose value starts with
/// `c` + the token gets an expiry of its ttl (after the prefix) + the new lease, as a claim
/// gives it; any other key is left alone.
///
/// KEYS = the keys; ARGV[1] = the lease in ms, then runs of (count, in-flight prefix) that cover
/// the keys in order. Returns one answer per key: 1 = renewed, 0 = not this claim's.
pub(super) const RENEW_SCRIPT: &str = r"
local lease = tonumber(ARGV[1])
local answers = {}
local i, a = 1, 2
while a < #ARGV do
  local last, mine = i + tonumber(ARGV[a]) - 1, ARGV[a + 1]
  for j = i, last do
    local held = redis.pcall('GET', KEYS[j])
    local answer = 0
    if type(held) == 'string' and string.sub(held, 1, 17) == mine then
      local keep = tonumber(string.sub(held, 18)) or 0
      redis.call('PEXPIRE', KEYS[j], keep + lease)
      answer = 1
    end
    answers[j] = answer
  end
  i, a = last + 1, a + 2
end
return answers
";

/// Keys per call of the batch scripts: Redis runs a script alone, so a call is kept short
/// (~1 ms) for the other clients of the server.
pub(super) const KEYS_PER_SCRIPT: usize = 1000;

/// The first bytes of the value of a key in flight: `c`, then the claim's token. Commits and
/// releases compare them.
pub(super) fn in_flight_prefix(token: Token) -> [u8; 17] {
    let mut value = [b'c'; 17];
    value[1..].copy_from_slice(&token.to_bytes());
    value
}

/// The longest in-flight value: the prefix and a ttl in decimal milliseconds.
pub(super) const IN_FLIGHT_MAX: usize = 17 + 20;

/// The value of a key in flight: [`in_flight_prefix`], then the ttl the key is kept for once
/// done, in decimal milliseconds (`0`: unknown). The key's expiry is that ttl plus the lease,
/// so the lease is over once no more than the ttl is left; a commit with the same ttl finds
/// exactly this value and keeps the expiry.
pub(super) fn in_flight_value(token: Token, keep_ms: u64) -> Vec<u8> {
    let mut value = Vec::with_capacity(IN_FLIGHT_MAX);
    value.extend_from_slice(&in_flight_prefix(token));
    value.extend_from_slice(keep_ms.to_string().as_bytes());
    value
}

/// Whether a key's value is a claim's in-flight value (a done value is 16 bytes).
pub(super) fn is_in_flight(value: &[u8]) -> bool {
    value.len() >= 17 && value[0] == b'c'
}

/// Runs of equal tokens in `tokens`, in order: (length, token). The keys of one claim batch
/// share a token, so a script call names each token once per run, not once per key.
pub(super) fn token_runs(tokens: &[Token]) -> Vec<(usize, Token)> {
    let mut runs: Vec<(usize, Token)> = Vec::new();
    for &token in tokens {
        match runs.last_mut() {
            Some((n, t)) if *t == token => *n += 1,
            _ => runs.push((1, token)),
        }
    }
    runs
}

/// The answers of one takeover script call, one per key in order.
pub(super) fn takeover_answers(op: &'static str, reply: Value) -> Result<Vec<Claimed>, StoreError> {
    let Value::Array(reply) = reply else {
        return Err(unexpected(op, reply));
    };
    reply
        .into_iter()
        .map(|answer| match answer {
            Value::Int(1) => Ok(Claimed::Mine),
            Value::Int(2) => Ok(Claimed::InFlight),
            Value::Int(3) => Ok(Claimed::Done),
            other => Err(unexpected(op, other)),
        })
        .collect()
}

/// The keys one commit script call refused, as indices into the whole call's keys: the reply
/// is how many keys the script went through (all of `range`, or the reply is an error), then
/// the 1-based positions it refused.
pub(super) fn refused_positions(
    op: &'static str,
    range: std::ops::Range<usize>,
    reply: Value,
) -> Result<Vec<usize>, StoreError> {
    let Value::Array(reply) = reply else {
        return Err(unexpected(op, reply));
    };
    let mut reply = reply.into_iter();
    match reply.next() {
        Some(Value::Int(n)) if usize::try_from(n).is_ok_and(|n| n == range.len()) => {}
        other => {
            return Err(StoreError::backend(
                op,
                format!(
                    "the commit script went through {other:?} of {} keys",
                    range.len()
                ),
            ));
        }
    }
    reply
        .map(|position| match position {
            Value::Int(j) if j >= 1 && usize::try_from(j).is_ok_and(|j| j <= range.len()) => {
                Ok(range.start + j as usize - 1)
            }
            other => Err(unexpected(op, other)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn takeover_replies_are_checked_before_they_are_believed() {
        use super::{Claimed, takeover_answers};
        use redis::Value::{Array, BulkString, Int, Nil};
        assert_eq!(
            takeover_answers("claim", Array(vec![Int(1), Int(2), Int(3)])).unwrap(),
            [Claimed::Mine, Claimed::InFlight, Claimed::Done]
        );
        for bad in [
            Array(vec![Int(0)]),
            Array(vec![Int(4)]),
            Array(vec![Int(1), Nil]),
            Array(vec![BulkString(b"1".to_vec())]),
            Int(1),
        ] {
            assert!(takeover_answers("claim", bad.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn commit_replies_are_checked_before_they_are_believed() {
        use super::refused_positions;
        use redis::Value::{Array, Int, Nil};
        let ok = |reply| refused_positions("commit", 1000..1004, reply);
        // All four went through, the 2nd and 4th refused.
        assert_eq!(
            ok(Array(vec![Int(4), Int(2), Int(4)])).unwrap(),
            [1001, 1003]
        );
        assert_eq!(ok(Array(vec![Int(4)])).unwrap(), Vec::<usize>::new());
        // A script that stopped early, positions outside its keys, replies of the wrong shape.
        for bad in [
            Array(vec![Int(3)]),
            Array(vec![]),
            Array(vec![Int(4), Int(0)]),
            Array(vec![Int(4), Int(5)]),
            Array(vec![Int(4), Int(-1)]),
            Array(vec![Int(4), Nil]),
            Int(1),
        ] {
            assert!(ok(bad.clone()).is_err(), "{bad:?}");
        }
    }
}
