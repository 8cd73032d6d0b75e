-- Accounts, API keys, conversations; requests and messages take over today's tables.

CREATE TABLE users (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username          text NOT NULL UNIQUE,
    email             text,
    role              text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    password_hash     text NOT NULL,               -- argon2id, PHC string
    system_prompt     text,                        -- the user's default system prompt
    default_model     text,
    default_params    jsonb NOT NULL DEFAULT '{}', -- default sampling: temperature, max_tokens, top_p
    disabled          boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    last_login_at     timestamptz
);

CREATE TABLE api_keys (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id       bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name          text NOT NULL,
    key_sha256    bytea NOT NULL UNIQUE,           -- never the key itself
    prefix        text NOT NULL,                   -- shown to tell keys apart
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);
CREATE INDEX api_keys_user ON api_keys (user_id);

CREATE TABLE conversations (
    id               uuid PRIMARY KEY,
    user_id          bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title            text,
    system_prompt    text,
    model            text,
    last_request_id  text,                         -- the newest turn; the next one waits for it
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    deleted_at       timestamptz
);
CREATE INDEX conversations_user_updated ON conversations (user_id, updated_at DESC, id DESC)
    WHERE deleted_at IS NULL;

-- chat_requests becomes requests: one row per generation request, usage included.
ALTER TABLE chat_requests RENAME TO requests;
ALTER TABLE requests RENAME COLUMN user_id TO client_user;       -- OpenAI's free-text `user`
ALTER TABLE requests RENAME COLUMN accepted_at TO created_at;
ALTER TABLE requests
    ADD COLUMN user_id            bigint REFERENCES users (id) ON DELETE SET NULL,
    ADD COLUMN key_id             bigint REFERENCES api_keys (id) ON DELETE SET NULL,
    ADD COLUMN conversation_id    uuid REFERENCES conversations (id) ON DELETE SET NULL,
    ADD COLUMN priority           text,
    ADD COLUMN purpose            text NOT NULL DEFAULT 'chat',
    ADD COLUMN prompt_tokens      integer,
    ADD COLUMN completion_tokens  integer;
ALTER INDEX chat_requests_pkey RENAME TO requests_pkey;

-- usage folds into requests (a usage row without a request row keeps its figures too).
UPDATE requests r
   SET prompt_tokens = u.prompt_tokens, completion_tokens = u.completion_tokens,
       finished_at = COALESCE(r.finished_at, u.recorded_at)
  FROM usage u
 WHERE u.request_id = r.request_id;
INSERT INTO requests (request_id, model, client_user, status, finished_at, prompt_tokens, completion_tokens)
SELECT u.request_id, u.model, u.user_id, 'completed', u.recorded_at, u.prompt_tokens, u.completion_tokens
  FROM usage u
 WHERE NOT EXISTS (SELECT 1 FROM requests r WHERE r.request_id = u.request_id);
DROP TABLE usage;
CREATE INDEX requests_finished ON requests (finished_at);
CREATE INDEX requests_user_finished ON requests (user_id, finished_at);

-- chat_messages becomes messages: a conversation's turns, or a /v1 request's prompt and answer.
ALTER TABLE chat_messages RENAME TO messages;
ALTER TABLE messages
    ADD COLUMN conversation_id  uuid REFERENCES conversations (id) ON DELETE CASCADE,
    ADD COLUMN token_in         integer,
    ADD COLUMN token_out        integer,
    ADD COLUMN created_at       timestamptz NOT NULL DEFAULT now();
ALTER INDEX chat_messages_pkey RENAME TO messages_pkey;
CREATE INDEX messages_conversation ON messages (conversation_id, position) WHERE conversation_id IS NOT NULL;
