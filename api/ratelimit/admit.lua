-- Admit a request against, or release it from, the rate limits of its scopes (api/ratelimit/limiter.py).
-- KEYS: three per scope, in order: its RPM bucket, its TPM bucket, its concurrency set.
-- ARGV: op ('a' admit, 'r' release), request id, hold (ms), tokens (the prompt at
-- admission; at release the output tokens plus the prompt correction, possibly < 0),
-- the Retry-After of a concurrency refusal (ms), then rpm, tpm, concurrency limits
-- (one triple per scope; 0 = no limit).
-- Returns {1} when admitted (or released), {0, scope index (1-based), limit, wait ms}.
if redis.replicate_commands then redis.replicate_commands() end
local WINDOW = 60000
local CONC_WAIT = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local op, rid = ARGV[1], ARGV[2]
local hold = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local n = #KEYS / 3

-- A bucket's tokens now: full when absent, else refilled at limit per WINDOW since ts.
local function level(key, limit)
  local v = redis.call('HMGET', key, 'tk', 'ts')
  if not v[1] then return limit end
  local elapsed = now - tonumber(v[2])
  if elapsed < 0 then elapsed = 0 end
  local tk = tonumber(v[1]) + elapsed * limit / WINDOW
  if tk > limit then tk = limit end
  return tk
end

-- Store a bucket's tokens; it expires when it would be full again (absent = full).
local function store(key, limit, tk)
  if tk >= limit then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'tk', string.format('%.17g', tk), 'ts', string.format('%.3f', now))
  -- (capped at a year: a PEXPIRE argument must print as an integer, not as 1e+14)
  redis.call('PEXPIRE', key, math.min(math.ceil((limit - tk) * WINDOW / limit) + 1, 31536000000))
end

local function limits(i)
  local b = 5 + 3 * (i - 1)
  return tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
end

if op == 'r' then
  for i = 1, n do
    local rpm, tpm, conc = limits(i)
    if tpm > 0 and cost ~= 0 then
      store(KEYS[3 * i - 1], tpm, level(KEYS[3 * i - 1], tpm) - cost)
    end
    if conc > 0 then redis.call('ZREM', KEYS[3 * i], rid) end
  end
  return {1}
end

-- Admission: check everything first, charge only when nothing refuses.
local refused, worst, wscope, wkind = false, -1, 0, ''
local levels = {}
local function refuse(i, kind, wait)
  refused = true
  if wait > worst then worst, wscope, wkind = wait, i, kind end
end
for i = 1, n do
  local rpm, tpm, conc = limits(i)
  if rpm > 0 then
    local tk = level(KEYS[3 * i - 2], rpm)
    levels[3 * i - 2] = tk
    if tk < 1 then refuse(i, 'rpm', (1 - tk) * WINDOW / rpm) end
  end
  if tpm > 0 then
    local tk = level(KEYS[3 * i - 1], tpm)
    levels[3 * i - 1] = tk
    local need = math.min(cost, tpm)
    if tk < need then refuse(i, 'tpm', (need - tk) * WINDOW / tpm) end
  end
  if conc > 0 then
    local ck = KEYS[3 * i]
    redis.call('ZREMRANGEBYSCORE', ck, '-inf', now)
    if not redis.call('ZSCORE', ck, rid) and redis.call('ZCARD', ck) >= conc then
      refuse(i, 'concurrency', CONC_WAIT)
    end
  end
end
if refused then return {0, wscope, wkind, math.ceil(worst)} end
for i = 1, n do
  local rpm, tpm, conc = limits(i)
  if rpm > 0 then store(KEYS[3 * i - 2], rpm, levels[3 * i - 2] - 1) end
  if tpm > 0 and cost ~= 0 then store(KEYS[3 * i - 1], tpm, levels[3 * i - 1] - cost) end
  if conc > 0 then
    local ck = KEYS[3 * i]
    redis.call('ZADD', ck, now + hold, rid)
    if redis.call('PTTL', ck) < hold then redis.call('PEXPIRE', ck, hold) end
  end
end
return {1}
