"""Rate limits and the login throttle, in one Redis shared by every API process:
`limiter` (requests, tokens and streams per user and per key), `login` (failed logins),
`breaker` (the Redis client and its circuit breaker); the Lua scripts are the `.lua` files."""

from api.ratelimit.limiter import RateLimited, RateLimiter, Ticket, estimate_prompt_tokens, scope_kind
from api.ratelimit.login import LoginThrottle, LoginThrottled

__all__ = [
    "LoginThrottle",
    "LoginThrottled",
    "RateLimited",
    "RateLimiter",
    "Ticket",
    "estimate_prompt_tokens",
    "scope_kind",
]
