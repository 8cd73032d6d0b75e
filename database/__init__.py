"""PostgreSQL: schema migrations and the account SQL."""
