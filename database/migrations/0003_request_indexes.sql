-- Indexes the foreign keys of requests (deleting a key, conversation or user sets them to
-- NULL: without these each delete scans the table) and the time usage is filtered by.
CREATE INDEX IF NOT EXISTS requests_key ON requests (key_id) WHERE key_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_conversation ON requests (conversation_id) WHERE conversation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_usage_time ON requests ((COALESCE(finished_at, created_at)));
CREATE INDEX IF NOT EXISTS requests_user_usage_time ON requests (user_id, (COALESCE(finished_at, created_at)));
