// The conversation's messages, following the answer as it streams unless the reader scrolled up.
import { useEffect, useRef, type RefObject } from "react";
import { CopyButton } from "../CopyButton";
import { Markdown } from "../Markdown";
import type { QueueInfo } from "../stream";
import type { UiMessage } from "./messages";

export function MessageList({
  messages,
  queue,
  loadError,
  follow,
  busy,
  lastUser,
  onRegenerate,
  onEdit,
}: {
  messages: UiMessage[];
  queue: QueueInfo | null;
  loadError: string | null;
  follow: RefObject<boolean>;
  busy: boolean;
  lastUser: UiMessage | undefined;
  onRegenerate: () => void;
  onEdit: () => void;
}) {
  const scroller = useRef<HTMLDivElement>(null);

  useEffect(() => {
    const el = scroller.current;
    if (el && follow.current) el.scrollTop = el.scrollHeight;
  }, [messages, queue, follow]);

  const onScroll = () => {
    const el = scroller.current;
    if (el) follow.current = el.scrollHeight - el.scrollTop - el.clientHeight < 48;
  };

  const last = messages.at(-1);
  return (
    <div className="messages" ref={scroller} onScroll={onScroll} aria-live="polite" data-testid="messages">
      {loadError && <p className="error" role="alert">{loadError}</p>}
      {messages.length === 0 && !loadError && <p className="empty">Ask anything. Enter sends, Shift+Enter is a new line.</p>}
      {messages.map((m) => (
        <article key={m.key} className={`message ${m.role}`} data-role={m.role} aria-label={m.role === "user" ? "You" : "Answer"}>
          {m.role === "user" ? <p className="user-text">{m.content}</p> : <Markdown text={m.content} />}
          {m.streaming && !m.content && (
            <p className="waiting" data-testid="waiting">
              {queue
                ? `Waiting in the queue: place ${queue.position} of ${queue.depth}` +
                  (queue.wait_s ? `, about ${Math.ceil(queue.wait_s)} s` : "")
                : "Thinking…"}
            </p>
          )}
          <footer className="message-tools">
            {!m.streaming && <CopyButton text={() => m.content} label={`Copy ${m.role === "user" ? "message" : "answer"}`} />}
            {m.stopped && <span className="meta">Stopped</span>}
            {m.stats && (
              <span className="meta stats" data-testid="stats">
                {m.stats.tokens} tokens
                {m.stats.ttft_s !== null && ` · first token ${m.stats.ttft_s.toFixed(2)} s`}
                {m.stats.tokens_per_s !== null && ` · ${m.stats.tokens_per_s.toFixed(1)} tokens/s`}
              </span>
            )}
            {m === last && m.role === "assistant" && !m.streaming && !busy && (
              <button type="button" className="small" onClick={onRegenerate}>
                Regenerate
              </button>
            )}
            {m === lastUser && !busy && (
              <button type="button" className="small" onClick={onEdit}>
                Edit
              </button>
            )}
          </footer>
        </article>
      ))}
    </div>
  );
}
