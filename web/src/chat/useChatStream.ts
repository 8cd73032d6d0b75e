// Sending a turn and streaming its answer: the messages on the page, the queue place, Stop,
// the failure (with the turn to send again) and the Retry-After countdown of a 429.
import { useCallback, useEffect, useRef, useState, type RefObject } from "react";
import { ApiError } from "../api";
import { streamChat, type ChatBody, type QueueInfo } from "../stream";
import { newKey, type Stats, type UiMessage } from "./messages";
import type { ChatParams } from "./useChatSettings";

export interface Failure {
  error: unknown;
  // The turn to send again (refused before it started), if any.
  retry: ChatBody | null;
}

// "answer": regenerate the last answer; "turn": replace the last question and its answer.
export type Replace = "none" | "answer" | "turn";

export function useChatStream({
  token,
  currentId,
  params,
  follow,
  onConversation,
  onFinished,
}: {
  token: string;
  currentId: RefObject<string | null>;
  params: () => ChatParams;
  follow: RefObject<boolean>;
  // The server took the turn; returns the id of a conversation it just created, if any.
  onConversation: (info: { conversation_id: string; model: string }) => string | null;
  onFinished: (created: string | null, ok: boolean) => void;
}) {
  const [messages, setMessages] = useState<UiMessage[]>([]);
  const [running, setRunning] = useState<AbortController | null>(null);
  const [queue, setQueue] = useState<QueueInfo | null>(null);
  const [failure, setFailure] = useState<Failure | null>(null);
  const [countdown, setCountdown] = useState<number | null>(null);
  const [autoRetry, setAutoRetry] = useState(true);
  // The settings as they are when a turn is sent; a ref so `send` (and the countdown) stays put.
  const latestParams = useRef(params);
  latestParams.current = params;

  const send = useCallback(
    async (text: string, replace: Replace) => {
      if (!text.trim() || running) return;
      const body: ChatBody = { message: text, ...latestParams.current() };
      const id = currentId.current;
      if (id) body.conversation_id = id;
      // Regenerate and edit replace the last turn on the server too (not a new turn).
      if (replace !== "none" && id) body.replace_last = true;

      setFailure(null);
      setCountdown(null);
      setQueue(null);
      setMessages((list) => {
        let kept = list;
        if (replace !== "none" && kept.at(-1)?.role === "assistant") kept = kept.slice(0, -1);
        if (replace !== "none" && kept.at(-1)?.role === "user") kept = kept.slice(0, -1);
        return [
          ...kept,
          { key: newKey(), role: "user", content: text },
          { key: newKey(), role: "assistant", content: "", streaming: true },
        ];
      });
      follow.current = true;
      const controller = new AbortController();
      setRunning(controller);
      const sentAt = performance.now();
      let firstAt: number | null = null;
      let tokens = 0;
      let started = false;
      let created: string | null = null;
      let ok = false;
      const updateLast = (change: (m: UiMessage) => UiMessage) =>
        setMessages((list) => (list.length ? [...list.slice(0, -1), change(list[list.length - 1])] : list));
      try {
        await streamChat(body, token, controller.signal, {
          conversation(info) {
            started = true;
            created = onConversation(info);
          },
          queue(info) {
            setQueue(info);
          },
          delta(chunk) {
            if (firstAt === null) {
              firstAt = performance.now();
              setQueue(null);
            }
            updateLast((m) => ({ ...m, content: m.content + chunk }));
          },
          usage(usage) {
            tokens = usage.completion_tokens;
          },
        });
        const end = performance.now();
        const stats: Stats = {
          tokens,
          ttft_s: firstAt === null ? null : (firstAt - sentAt) / 1000,
          tokens_per_s: firstAt !== null && end > firstAt && tokens > 1 ? (tokens - 1) / ((end - firstAt) / 1000) : null,
        };
        updateLast((m) => ({ ...m, streaming: false, stats }));
        ok = true;
      } catch (error) {
        if ((error as Error).name === "AbortError") {
          updateLast((m) => ({ ...m, streaming: false, stopped: true }));
        } else if (error instanceof ApiError && error.status !== 200 && !started) {
          // Refused before it started: nothing was stored; the question can be sent again.
          setMessages((list) => list.slice(0, -1));
          setFailure({ error, retry: body });
          if (error.retryAfter !== null && error.status === 429) setCountdown(error.retryAfter);
        } else {
          updateLast((m) => ({ ...m, streaming: false, failed: true }));
          setFailure({ error, retry: null });
        }
      } finally {
        setQueue(null);
        setRunning(null);
        onFinished(created, ok);
      }
    },
    [running, currentId, follow, token, onConversation, onFinished],
  );

  const retryNow = useCallback(() => {
    const retry = failure?.retry;
    if (!retry) return;
    setMessages((list) => (list.at(-1)?.role === "user" ? list.slice(0, -1) : list));
    void send(retry.message, "none");
  }, [failure, send]);

  // The Retry-After countdown of a 429; at zero, send again if the user wants.
  useEffect(() => {
    if (countdown === null) return;
    if (countdown <= 0) {
      setCountdown(null);
      if (autoRetry) retryNow();
      return;
    }
    const timer = setTimeout(() => setCountdown((c) => (c === null ? null : c - 1)), 1000);
    return () => clearTimeout(timer);
  }, [countdown, autoRetry, retryNow]);

  const dismiss = () => {
    setFailure(null);
    setCountdown(null);
  };

  return {
    messages,
    setMessages,
    running,
    queue,
    failure,
    setFailure,
    countdown,
    autoRetry,
    setAutoRetry,
    send,
    retryNow,
    dismiss,
  };
}

export type ChatStream = ReturnType<typeof useChatStream>;
