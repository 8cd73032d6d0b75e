"""Consumes chat.events.> and writes PostgreSQL, idempotently, keyed by request id."""
