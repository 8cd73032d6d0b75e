-- A login token carries its user's token_version (claim `ver`) and is refused once they
-- differ: a password change or reset, or a logout, adds one and so ends every earlier token.
ALTER TABLE users ADD COLUMN IF NOT EXISTS token_version integer NOT NULL DEFAULT 0;
