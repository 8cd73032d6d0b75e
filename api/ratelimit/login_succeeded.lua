-- A right password (api/ratelimit/login.py): the username+address counter is
-- forgotten, the address gets its attempt back. KEYS: as login_attempt.lua.
redis.call('DEL', KEYS[1])
if tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then redis.call('DECR', KEYS[2]) end
return 1
