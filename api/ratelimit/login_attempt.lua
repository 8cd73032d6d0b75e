-- Count a login attempt (api/ratelimit/login.py).
-- KEYS: the username+address counter, the address counter. ARGV: their limits
-- (0 = none), the window (s). When a counter is at its limit, returns the ms until its
-- window ends; otherwise counts the attempt in both (a new counter expires at the end of
-- its window: fixed windows) and returns 0. Counting before the password is checked, in
-- one script, means guesses sent at once cannot pass the limit together.
local wait = 0
for i = 1, 2 do
  local limit = tonumber(ARGV[i])
  if limit > 0 and tonumber(redis.call('GET', KEYS[i]) or '0') >= limit then
    local ttl = redis.call('PTTL', KEYS[i])
    if ttl < 0 then ttl = 1000 end
    if ttl > wait then wait = ttl end
  end
end
if wait > 0 then return wait end
for i = 1, 2 do
  if tonumber(ARGV[i]) > 0 and redis.call('INCR', KEYS[i]) == 1 then
    redis.call('EXPIRE', KEYS[i], tonumber(ARGV[3]))
  end
end
return 0
