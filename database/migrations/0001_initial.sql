-- The schema before accounts (chatq up to issue 6), as it was created then: IF NOT EXISTS
-- so a database made by that version adopts this migration as already applied.
CREATE TABLE IF NOT EXISTS chat_requests (
    request_id     text PRIMARY KEY,
    model          text NOT NULL,
    user_id        text,
    status         text NOT NULL,
    accepted_at    timestamptz,
    finished_at    timestamptz,
    worker_id      text,
    finish_reason  text,
    error_code     text,
    error_message  text,
    ttft_ms        double precision,
    duration_ms    double precision
);
CREATE TABLE IF NOT EXISTS chat_messages (
    request_id  text NOT NULL,
    position    integer NOT NULL,
    role        text NOT NULL,
    content     text NOT NULL,
    PRIMARY KEY (request_id, position)
);
CREATE TABLE IF NOT EXISTS usage (
    request_id         text PRIMARY KEY,
    model              text NOT NULL,
    user_id            text,
    prompt_tokens      integer NOT NULL,
    completion_tokens  integer NOT NULL,
    recorded_at        timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_recorded_at ON usage (recorded_at);
