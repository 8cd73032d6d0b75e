// POST /api/chat and read its server-sent events (fetch streaming + eventsource-parser),
// so the request carries the Authorization header and an AbortController can stop it.
import { EventSourceParserStream } from "eventsource-parser/stream";
import { ApiError, request, type ErrorBody } from "./api";

export interface ChatBody {
  message: string;
  conversation_id?: string;
  model?: string;
  temperature?: number;
  max_tokens?: number;
  system_prompt?: string;
  // Replace the conversation's last turn (regenerate, edit and resend).
  replace_last?: boolean;
}

export interface QueueInfo {
  position: number;
  depth: number;
  wait_s: number | null;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
}

export interface StreamHandlers {
  conversation(info: { conversation_id: string; request_id: string; model: string }): void;
  queue(info: QueueInfo): void;
  delta(text: string): void;
  usage(usage: Usage): void;
}

interface Chunk {
  choices?: { delta?: { content?: string | null }; finish_reason?: string | null }[];
  usage?: Usage | null;
}

/** Streams one turn; resolves at [DONE], throws ApiError (before or during the stream). */
export async function streamChat(
  body: ChatBody,
  token: string | null,
  signal: AbortSignal,
  on: StreamHandlers,
): Promise<void> {
  const response = await request("/api/chat", token, {
    method: "POST",
    body,
    signal,
    headers: { Accept: "text/event-stream" },
  });
  if (!response.body) throw new ApiError(response.status, { code: "worker_lost", message: "the answer has no body" });
  const events = response.body
    .pipeThrough(new TextDecoderStream())
    .pipeThrough(new EventSourceParserStream())
    .getReader();
  let finished = false;
  try {
    for (;;) {
      const { value: event, done } = await events.read();
      if (done) break;
      if (event.event === "conversation") on.conversation(JSON.parse(event.data));
      else if (event.event === "queue") on.queue(JSON.parse(event.data) as QueueInfo);
      else if (event.event === "error") {
        const parsed = JSON.parse(event.data) as { error: ErrorBody };
        throw new ApiError(200, parsed.error);
      } else if (event.data === "[DONE]") {
        finished = true;
        break;
      } else {
        const chunk = JSON.parse(event.data) as Chunk;
        const text = chunk.choices?.[0]?.delta?.content;
        if (text) on.delta(text);
        if (chunk.usage) on.usage(chunk.usage);
      }
    }
  } finally {
    events.cancel().catch(() => undefined);
  }
  if (!finished) {
    throw new ApiError(200, { code: "worker_lost", message: "the answer stopped before it ended" });
  }
}
