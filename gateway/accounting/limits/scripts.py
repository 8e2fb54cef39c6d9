"""The Lua scripts behind ``RedisLimiter``; each runs atomically inside Redis."""

# KEYS: rpm bucket, tpm bucket, in-flight set, reservations, period spend.
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
if rpm > 0 and requests_left < 1 then
  return reply(1, math.ceil((1 - requests_left) * 60000 / rpm))
end
if tpm > 0 and (tokens > tpm or tokens_left < tokens) then
  return reply(2, math.ceil((tokens - tokens_left) * 60000 / tpm))
end

local tracked = max_concurrency > 0 or budget >= 0
if tracked then
  -- Leases of admissions that were never settled (their replica died) have run out: forget them.
  local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
    redis.call('HDEL', KEYS[4], unpack(expired))
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
  local reserved = 0
  for _, units in ipairs(redis.call('HVALS', KEYS[4])) do reserved = reserved + tonumber(units) end
  if settled + reserved + cost > budget then return reply(6) end
  redis.call('HSET', KEYS[4], id, cost)
  redis.call('PEXPIRE', KEYS[4], lease)
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

# KEYS: tpm bucket, in-flight set, reservations, period spend.
# ARGV: admission id, reserved tokens, actual tokens, tpm (0: none), actual cost units.
SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
-- Without a base the period is not loaded; it will be read from the usage table, this row included.
if tonumber(ARGV[5]) > 0 and redis.call('HEXISTS', KEYS[4], 'base') == 1 then
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
