// POST /api/chat and read its server-sent events (fetch streaming + eventsource-parser),
// so the request carries the Authorization header and an AbortController can stop it.
import { EventSourceParserStream } from "eventsource-parser/stream";
import { ApiError, authHeaders, errorFrom, type ErrorBody } from "./api";

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
  let response: Response;
  try {
    response = await fetch("/api/chat", {
      method: "POST",
      headers: { ...authHeaders(token), Accept: "text/event-stream" },
      body: JSON.stringify(body),
      signal,
    });
  } catch (error) {
    if ((error as Error).name === "AbortError") throw error;
    throw new ApiError(0, { code: "network", message: "the server cannot be reached" });
  }
  if (!response.ok || !response.body) throw await errorFrom(response);
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
