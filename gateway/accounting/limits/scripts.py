"""The Lua scripts behind ``RedisLimiter``; each runs atomically inside Redis."""

# KEYS: rpm bucket, tpm bucket, in-flight set, reservations, period spend, withdrawn admissions.
# ARGV: rpm, tpm, tokens, max concurrency (0: no limit), budget units (-1: none), cost units,
#       admission id, lease ms, spend ttl s (0: none).
# Returns {outcome, requests left, tokens left, retry ms}; outcomes are listed in redis_limiter.py.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_concurrency, budget, cost = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local id, lease = ARGV[7], tonumber(ARGV[8])

local function level(key, limit)
  local state = redis.call('HMGET', key, 'level', 'ts')
  if not state[1] then return limit end
  return math.min(limit, tonumber(state[1]) + (now - tonumber(state[2])) * limit / 60000)
end

local requests_left, tokens_left = 0, 0
if rpm > 0 then requests_left = level(KEYS[1], rpm) end
if tpm > 0 then tokens_left = level(KEYS[2], tpm) end
local function reply(outcome, retry_ms)
  return {outcome, tostring(requests_left), tostring(tokens_left), tostring(retry_ms or 0)}
end
-- A replica that lost this call's reply has withdrawn the admission (see SETTLE); the call
-- itself may still arrive afterwards, from a connection that hung: it must not take anything.
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now)
if redis.call('ZSCORE', KEYS[6], id) then return reply(7) end
if rpm > 0 and requests_left < 1 then
  return reply(1, math.ceil((1 - requests_left) * 60000 / rpm))
end
if tpm > 0 and (tokens > tpm or tokens_left < tokens) then
  return reply(2, math.ceil((tokens - tokens_left) * 60000 / tpm))
end

local tracked = max_concurrency > 0 or budget >= 0
local reserved = 0
if tracked then
  -- Leases of admissions that were never settled (their replica died, or could not reach Redis
  -- for the whole lease) have run out: their slots are free again.
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  -- Their reservations go too, but the period's spend may lack what those requests cost: it is
  -- read again from the usage table, where their rows are ('reloading' until then, see SETTLE).
  local held = redis.call('HGETALL', KEYS[4])
  local lost = false
  for i = 1, #held, 2 do
    if redis.call('ZSCORE', KEYS[3], held[i]) then
      reserved = reserved + tonumber(held[i + 1])
    else
      redis.call('HDEL', KEYS[4], held[i])
      lost = true
    end
  end
  if lost then
    redis.call('HDEL', KEYS[5], 'base', 'settled')
    redis.call('HSET', KEYS[5], 'reloading', 1)
  end
  if max_concurrency > 0 and redis.call('ZCARD', KEYS[3]) >= max_concurrency then
    return reply(3)
  end
end
if budget >= 0 then
  local spend = redis.call('HMGET', KEYS[5], 'base', 'settled')
  if not spend[1] then return reply(5) end
  local settled = tonumber(spend[1]) + tonumber(spend[2] or 0)
  if settled + cost > budget then return reply(4) end
  if settled + reserved + cost > budget then return reply(6) end
  redis.call('HSET', KEYS[4], id, cost)
  -- Kept past every lease in it, so that a lost reservation is always noticed (above).
  local keep_ms = tonumber(ARGV[9]) * 1000
  if keep_ms > 0 then
    redis.call('PEXPIRE', KEYS[4], math.max(keep_ms, 2 * lease))
  else
    redis.call('PERSIST', KEYS[4])
  end
end

if tracked then
  redis.call('ZADD', KEYS[3], now + lease, id)
  redis.call('PEXPIRE', KEYS[3], lease)
end
if rpm > 0 then
  requests_left = requests_left - 1
  redis.call('HSET', KEYS[1], 'level', tostring(requests_left), 'ts', now)
  redis.call('PEXPIRE', KEYS[1], 60000)
end
if tpm > 0 then
  tokens_left = tokens_left - tokens
  redis.call('HSET', KEYS[2], 'level', tostring(tokens_left), 'ts', now)
  -- A bucket in debt takes longer than a minute to refill; keep it until then.
  redis.call('PEXPIRE', KEYS[2], math.ceil(60000 * (tpm - tokens_left) / tpm) + 1000)
end
return reply(0)
"""

# KEYS: tpm bucket, in-flight set, reservations, period spend, withdrawn admissions.
# ARGV: admission id, reserved tokens, actual tokens, tpm (0: none), actual cost units,
#       tracked (1: the admission holds a slot or a reservation), withdraw (1: its reply was lost),
#       lease ms.
SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held = redis.call('ZREM', KEYS[2], ARGV[1]) + redis.call('HDEL', KEYS[3], ARGV[1])
if ARGV[7] == '1' then
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[8]), ARGV[1])
  redis.call('PEXPIRE', KEYS[5], tonumber(ARGV[8]))
end
-- A tracked admission settles once: a settlement retried after its first try did arrive (a reply
-- lost on a hung connection) finds nothing held, and neither counts the cost nor refunds again.
if ARGV[6] == '1' and held == 0 then return 0 end
-- Without a base the period is not loaded; it will be read from the usage table, this row included.
-- While it is being read again ('reloading') the cost is counted all the same: a row the reload
-- reads as well is counted twice, which only makes the limiter stricter, never lets it overspend.
if tonumber(ARGV[5]) > 0 and (redis.call('HEXISTS', KEYS[4], 'base') == 1
    or redis.call('HEXISTS', KEYS[4], 'reloading') == 1) then
  redis.call('HINCRBY', KEYS[4], 'settled', ARGV[5])
end
local tpm = tonumber(ARGV[4])
local refund = tonumber(ARGV[2]) - tonumber(ARGV[3])
if tpm > 0 and refund ~= 0 then
  local state = redis.call('HMGET', KEYS[1], 'level', 'ts')
  local level = tpm
  if state[1] then
    level = math.min(tpm, tonumber(state[1]) + (now - tonumber(state[2])) * tpm / 60000)
  end
  level = math.min(tpm, level + refund)
  redis.call('HSET', KEYS[1], 'level', tostring(level), 'ts', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil(60000 * (tpm - level) / tpm) + 1000)
end
return 1
"""
