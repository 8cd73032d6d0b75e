// The chat page: sidebar of conversations, the messages, the composer and the settings.
import { useCallback, useEffect, useRef, useState, type KeyboardEvent } from "react";
import { useLocation } from "wouter";
import {
  ApiError,
  api,
  canRegenerate,
  describeError,
  isSessionError,
  type ConversationFull,
  type ConversationRow,
  type Health,
  type UserSettings,
} from "./api";
import type { Session } from "./session";
import { CopyButton } from "./CopyButton";
import { Markdown } from "./Markdown";
import { Sidebar } from "./Sidebar";
import { streamChat, type ChatBody, type QueueInfo } from "./stream";

const DRAFT_KEY = "chatq.draft";

interface Stats {
  tokens: number;
  ttft_s: number | null;
  tokens_per_s: number | null;
}

interface UiMessage {
  key: number;
  role: "user" | "assistant";
  content: string;
  streaming?: boolean;
  stopped?: boolean;
  failed?: boolean;
  stats?: Stats;
}

interface Failure {
  error: unknown;
  // The turn to send again (refused before it started), if any.
  retry: ChatBody | null;
}

let nextKey = 1;

export function ChatPage({
  session,
  conversationId,
  onLogout,
}: {
  session: Session;
  conversationId: string | null;
  onLogout: () => void;
}) {
  const token = session.token;
  const [, navigate] = useLocation();
  const [messages, setMessages] = useState<UiMessage[]>([]);
  const [draft, setDraft] = useState(() => sessionStorage.getItem(DRAFT_KEY) ?? "");
  const [editing, setEditing] = useState(false);
  const [running, setRunning] = useState<AbortController | null>(null);
  const [queue, setQueue] = useState<QueueInfo | null>(null);
  const [failure, setFailure] = useState<Failure | null>(null);
  const [countdown, setCountdown] = useState<number | null>(null);
  const [autoRetry, setAutoRetry] = useState(true);
  const [conversations, setConversations] = useState<ConversationRow[]>([]);
  const [search, setSearch] = useState("");
  const [sidebarOpen, setSidebarOpen] = useState(false);
  const [defaults, setDefaults] = useState<UserSettings | null>(null);
  const [systemPrompt, setSystemPrompt] = useState("");
  const [model, setModel] = useState("");
  const [temperature, setTemperature] = useState("");
  const [maxTokens, setMaxTokens] = useState("");
  const [models, setModels] = useState<string[]>([]);
  const [ready, setReady] = useState<Record<string, number>>({});
  const [loadError, setLoadError] = useState<string | null>(null);
  const currentId = useRef<string | null>(conversationId);
  const ownConversation = useRef<string | null>(null);
  const scroller = useRef<HTMLDivElement>(null);
  const follow = useRef(true);
  const composer = useRef<HTMLTextAreaElement>(null);

  // --- data ------------------------------------------------------------------------------

  const loadList = useCallback(
    async (q: string) => {
      const query = new URLSearchParams({ limit: "100" });
      if (q) query.set("q", q);
      try {
        const page = await api<{ conversations: ConversationRow[] }>(`/api/conversations?${query}`, token);
        setConversations(page.conversations);
      } catch (error) {
        if (!isSessionError(error)) setLoadError(describeError(error));
      }
    },
    [token],
  );

  useEffect(() => {
    const timer = setTimeout(() => void loadList(search), search ? 250 : 0);
    return () => clearTimeout(timer);
  }, [search, loadList]);

  useEffect(() => {
    api<UserSettings>("/api/me/settings", token)
      .then((s) => {
        setDefaults(s);
        if (!currentId.current) setSystemPrompt(s.system_prompt ?? "");
        setTemperature(s.params.temperature?.toString() ?? "");
        setMaxTokens(s.params.max_tokens?.toString() ?? "");
        if (s.model) setModel((m) => m || s.model!);
      })
      .catch(() => undefined);
  }, [token]);

  // The models and how many workers serve each, refreshed while the page is open.
  useEffect(() => {
    let stop = false;
    const refresh = async () => {
      try {
        const list = await api<{ data: { id: string }[] }>("/v1/models", token);
        const health = await api<Health>("/health", null);
        if (stop) return;
        setModels(list.data.map((m) => m.id));
        setReady(health.services.workers.models ?? {});
        setModel((m) => m || list.data[0]?.id || "");
      } catch {
        // shown on the next refresh
      }
    };
    void refresh();
    const timer = setInterval(refresh, 10_000);
    return () => {
      stop = true;
      clearInterval(timer);
    };
  }, [token]);

  // Open the conversation the address names (not the one this page just started).
  useEffect(() => {
    currentId.current = conversationId;
    setSidebarOpen(false);
    if (conversationId === null) {
      if (ownConversation.current === null) {
        setMessages([]);
        setSystemPrompt(defaults?.system_prompt ?? "");
      }
      return;
    }
    if (conversationId === ownConversation.current) return;
    ownConversation.current = null;
    setFailure(null);
    setLoadError(null);
    api<ConversationFull>(`/api/conversations/${encodeURIComponent(conversationId)}`, token)
      .then((c) => {
        if (currentId.current !== conversationId) return;
        setMessages(
          c.messages
            .filter((m) => m.role === "user" || m.role === "assistant")
            .map((m) => ({ key: nextKey++, role: m.role as "user" | "assistant", content: m.content })),
        );
        setSystemPrompt(c.system_prompt ?? "");
        if (c.model) setModel(c.model);
        follow.current = true;
      })
      .catch((error) => {
        if (!isSessionError(error)) setLoadError(describeError(error));
      });
    // defaults only matter for a new conversation
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [conversationId, token]);

  // Follow the answer unless the reader scrolled up.
  useEffect(() => {
    const el = scroller.current;
    if (el && follow.current) el.scrollTop = el.scrollHeight;
  }, [messages, queue]);

  const onScroll = () => {
    const el = scroller.current;
    if (el) follow.current = el.scrollHeight - el.scrollTop - el.clientHeight < 48;
  };

  // The automatic title of a new conversation arrives after its first answer.
  const awaitTitle = useCallback(
    async (id: string) => {
      for (let i = 0; i < 30; i++) {
        await new Promise((r) => setTimeout(r, 1000));
        try {
          const c = await api<ConversationRow>(`/api/conversations/${id}`, token);
          if (c.title) {
            setConversations((list) => list.map((row) => (row.id === id ? { ...row, title: c.title } : row)));
            return;
          }
        } catch {
          return;
        }
      }
    },
    [token],
  );

  // --- sending ---------------------------------------------------------------------------

  const send = useCallback(
    async (text: string, replace: "none" | "answer" | "turn") => {
      if (!text.trim() || running) return;
      const body: ChatBody = { message: text };
      const id = currentId.current;
      if (id) body.conversation_id = id;
      if (model) body.model = model;
      const t = Number.parseFloat(temperature);
      if (temperature.trim() && Number.isFinite(t)) body.temperature = t;
      const n = Number.parseInt(maxTokens, 10);
      if (maxTokens.trim() && Number.isFinite(n) && n > 0) body.max_tokens = n;
      if (systemPrompt.trim()) body.system_prompt = systemPrompt;
      // Regenerate and edit replace the last turn on the server too (not a new turn).
      if (replace !== "none" && id) body.replace_last = true;

      setFailure(null);
      setCountdown(null);
      setQueue(null);
      setEditing(false);
      setMessages((list) => {
        let kept = list;
        if (replace !== "none" && kept.at(-1)?.role === "assistant") kept = kept.slice(0, -1);
        if (replace !== "none" && kept.at(-1)?.role === "user") kept = kept.slice(0, -1);
        return [
          ...kept,
          { key: nextKey++, role: "user", content: text },
          { key: nextKey++, role: "assistant", content: "", streaming: true },
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
      const updateLast = (change: (m: UiMessage) => UiMessage) =>
        setMessages((list) => (list.length ? [...list.slice(0, -1), change(list[list.length - 1])] : list));
      try {
        await streamChat(body, token, controller.signal, {
          conversation(info) {
            started = true;
            sessionStorage.removeItem(DRAFT_KEY);
            if (!currentId.current) {
              created = info.conversation_id;
              currentId.current = created;
              ownConversation.current = created;
              const now = new Date().toISOString();
              setConversations((list) => [
                { id: created!, title: null, system_prompt: null, model: info.model, created_at: now, updated_at: now },
                ...list,
              ]);
              navigate(`/c/${created}`, { replace: true });
            }
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
        if (created) void awaitTitle(created);
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
        void loadList(search);
      }
    },
    [running, model, temperature, maxTokens, systemPrompt, token, navigate, awaitTitle, loadList, search],
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

  const submit = () => {
    const text = draft;
    if (!text.trim() || running) return;
    setDraft("");
    void send(text, editing ? "turn" : "none");
  };

  const onKeyDown = (event: KeyboardEvent<HTMLTextAreaElement>) => {
    if (event.key === "Enter" && !event.shiftKey && !event.nativeEvent.isComposing) {
      event.preventDefault();
      submit();
    } else if (event.key === "Escape") {
      if (running) running.abort();
      else if (editing) {
        setEditing(false);
        setDraft("");
      }
    }
  };

  let lastUser: UiMessage | undefined;
  for (let i = messages.length - 1; i >= 0 && !lastUser; i--) if (messages[i].role === "user") lastUser = messages[i];
  const regenerate = () => {
    if (lastUser) void send(lastUser.content, "answer");
  };
  const editLast = () => {
    if (!lastUser) return;
    setEditing(true);
    setDraft(lastUser.content);
    composer.current?.focus();
  };

  const newChat = () => {
    ownConversation.current = null;
    currentId.current = null;
    setMessages([]);
    setFailure(null);
    setSystemPrompt(defaults?.system_prompt ?? "");
    navigate("/");
    composer.current?.focus();
  };

  const saveDefaults = async () => {
    const params = {
      temperature: temperature.trim() ? Number.parseFloat(temperature) : null,
      max_tokens: maxTokens.trim() ? Number.parseInt(maxTokens, 10) : null,
      top_p: defaults?.params.top_p ?? null,
    };
    try {
      const saved = await api<UserSettings>("/api/me/settings", token, {
        method: "PUT",
        body: { system_prompt: systemPrompt || null, model: model || null, params },
      });
      setDefaults(saved);
    } catch (error) {
      setFailure({ error, retry: null });
    }
  };

  // --- view ------------------------------------------------------------------------------

  const last = messages.at(-1);
  return (
    <div className={`layout${sidebarOpen ? " sidebar-open" : ""}`}>
      <Sidebar
        token={token}
        conversations={conversations}
        setConversations={setConversations}
        activeId={conversationId}
        search={search}
        setSearch={setSearch}
        onNew={newChat}
        onOpen={(id) => navigate(`/c/${id}`)}
        onDeleted={(id) => {
          if (id === conversationId) newChat();
        }}
        user={session.user}
        onLogout={onLogout}
      />
      <main className="chat">
        <header className="topbar">
          <button
            type="button"
            className="menu"
            aria-label="Conversations"
            aria-expanded={sidebarOpen}
            onClick={() => setSidebarOpen((o) => !o)}
          >
            ☰
          </button>
          <label className="model-picker">
            <span className="visually-hidden">Model</span>
            <select value={model} onChange={(e) => setModel(e.target.value)} aria-label="Model">
              {models.map((m) => (
                <option key={m} value={m}>
                  {m} — {ready[m] ? `${ready[m]} worker${ready[m] > 1 ? "s" : ""} ready` : "no worker ready"}
                </option>
              ))}
            </select>
          </label>
          <details className="settings">
            <summary>Settings</summary>
            <div className="settings-body">
              <label>
                System prompt
                <textarea rows={3} value={systemPrompt} onChange={(e) => setSystemPrompt(e.target.value)} />
              </label>
              <div className="row">
                <label>
                  Temperature
                  <input
                    type="number"
                    min={0}
                    max={2}
                    step={0.1}
                    value={temperature}
                    placeholder="default"
                    onChange={(e) => setTemperature(e.target.value)}
                  />
                </label>
                <label>
                  Max tokens
                  <input
                    type="number"
                    min={1}
                    step={1}
                    value={maxTokens}
                    placeholder="default"
                    onChange={(e) => setMaxTokens(e.target.value)}
                  />
                </label>
              </div>
              <button type="button" onClick={saveDefaults}>
                Save as my defaults
              </button>
            </div>
          </details>
        </header>

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
                {m === last && m.role === "assistant" && !m.streaming && !running && (
                  <button type="button" className="small" onClick={regenerate}>
                    Regenerate
                  </button>
                )}
                {m === lastUser && !running && (
                  <button type="button" className="small" onClick={editLast}>
                    Edit
                  </button>
                )}
              </footer>
            </article>
          ))}
        </div>

        {failure && (
          <div className="banner error" role="alert" data-testid="error">
            <span>{describeError(failure.error)}</span>
            {countdown !== null && (
              <>
                <span data-testid="countdown"> Try again in {countdown} s.</span>
                <label className="inline">
                  <input type="checkbox" checked={autoRetry} onChange={(e) => setAutoRetry(e.target.checked)} />
                  Retry when it ends
                </label>
              </>
            )}
            {failure.retry && countdown === null && (
              <button type="button" className="small" onClick={retryNow}>
                Send again
              </button>
            )}
            {canRegenerate(failure.error) && (
              <button type="button" className="small" onClick={regenerate}>
                Regenerate
              </button>
            )}
            <button type="button" className="small" aria-label="Dismiss" onClick={() => { setFailure(null); setCountdown(null); }}>
              ✕
            </button>
          </div>
        )}

        <form
          className="composer"
          onSubmit={(e) => {
            e.preventDefault();
            submit();
          }}
        >
          {editing && <p className="meta">Editing your last message: sending replaces it and its answer. Escape cancels.</p>}
          <label className="visually-hidden" htmlFor="composer">
            Message
          </label>
          <textarea
            id="composer"
            ref={composer}
            rows={2}
            value={draft}
            placeholder="Message (Enter sends, Shift+Enter new line)"
            onChange={(e) => {
              setDraft(e.target.value);
              sessionStorage.setItem(DRAFT_KEY, e.target.value);
            }}
            onKeyDown={onKeyDown}
            autoFocus
          />
          {running ? (
            <button type="button" className="stop" onClick={() => running.abort()}>
              Stop
            </button>
          ) : (
            <button type="submit" className="primary" disabled={!draft.trim()}>
              Send
            </button>
          )}
        </form>
      </main>
    </div>
  );
}
