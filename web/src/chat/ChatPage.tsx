// The chat page: the sidebar of conversations, the messages, the composer and the settings,
// put together from the hooks and components beside it.
import { useCallback, useEffect, useRef, useState } from "react";
import { useLocation } from "wouter";
import { api, describeError, isSessionError, type ConversationFull } from "../api";
import type { Session } from "../session";
import { Sidebar } from "../Sidebar";
import { Composer, DRAFT_KEY } from "./Composer";
import { FailureBanner } from "./FailureBanner";
import { lastUserMessage, newKey } from "./messages";
import { MessageList } from "./MessageList";
import { TopBar } from "./TopBar";
import { useChatSettings } from "./useChatSettings";
import { useChatStream } from "./useChatStream";
import { useConversations } from "./useConversations";
import { useModels } from "./useModels";

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
  const [draft, setDraft] = useState(() => sessionStorage.getItem(DRAFT_KEY) ?? "");
  const [editing, setEditing] = useState(false);
  const [sidebarOpen, setSidebarOpen] = useState(false);
  const [loadError, setLoadError] = useState<string | null>(null);
  // The conversation turns go to, and the one this page started (its address changes under it).
  const currentId = useRef<string | null>(conversationId);
  const ownConversation = useRef<string | null>(null);
  const follow = useRef(true);
  const composer = useRef<HTMLTextAreaElement>(null);

  const list = useConversations(token, setLoadError);
  const settings = useChatSettings(token, currentId);
  const { models, ready } = useModels(token, settings.offerModel);
  const { added, awaitTitle, reload } = list;

  const onConversation = useCallback(
    (info: { conversation_id: string; model: string }) => {
      sessionStorage.removeItem(DRAFT_KEY);
      if (currentId.current) return null;
      const created = info.conversation_id;
      currentId.current = created;
      ownConversation.current = created;
      added(created, info.model);
      navigate(`/c/${created}`, { replace: true });
      return created;
    },
    [added, navigate],
  );
  const onFinished = useCallback(
    (created: string | null, ok: boolean) => {
      if (created && ok) void awaitTitle(created);
      reload();
    },
    [awaitTitle, reload],
  );
  const chat = useChatStream({ token, currentId, params: settings.params, follow, onConversation, onFinished });
  const { setMessages, setFailure } = chat;

  // Open the conversation the address names (not the one this page just started).
  useEffect(() => {
    currentId.current = conversationId;
    setSidebarOpen(false);
    if (conversationId === null) {
      if (ownConversation.current === null) {
        setMessages([]);
        settings.resetPrompt();
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
            .map((m) => ({ key: newKey(), role: m.role as "user" | "assistant", content: m.content })),
        );
        settings.setSystemPrompt(c.system_prompt ?? "");
        if (c.model) settings.setModel(c.model);
        follow.current = true;
      })
      .catch((error) => {
        if (!isSessionError(error)) setLoadError(describeError(error));
      });
    // defaults only matter for a new conversation
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [conversationId, token]);

  const send = (text: string, replace: "none" | "answer" | "turn") => {
    setEditing(false);
    void chat.send(text, replace);
  };

  const submit = () => {
    const text = draft;
    if (!text.trim() || chat.running) return;
    setDraft("");
    send(text, editing ? "turn" : "none");
  };

  const lastUser = lastUserMessage(chat.messages);
  const regenerate = () => {
    if (lastUser) send(lastUser.content, "answer");
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
    settings.resetPrompt();
    navigate("/");
    composer.current?.focus();
  };

  const saveDefaults = () => settings.saveDefaults().catch((error: unknown) => setFailure({ error, retry: null }));

  return (
    <div className={`layout${sidebarOpen ? " sidebar-open" : ""}`}>
      <Sidebar
        token={token}
        conversations={list.conversations}
        setConversations={list.setConversations}
        activeId={conversationId}
        search={list.search}
        setSearch={list.setSearch}
        onNew={newChat}
        onOpen={(id) => navigate(`/c/${id}`)}
        onDeleted={(id) => {
          if (id === conversationId) newChat();
        }}
        user={session.user}
        onLogout={onLogout}
      />
      <main className="chat">
        <TopBar
          settings={settings}
          models={models}
          ready={ready}
          sidebarOpen={sidebarOpen}
          onToggleSidebar={() => setSidebarOpen((o) => !o)}
          onSaveDefaults={() => void saveDefaults()}
        />
        <MessageList
          messages={chat.messages}
          queue={chat.queue}
          loadError={loadError}
          follow={follow}
          busy={chat.running !== null}
          lastUser={lastUser}
          onRegenerate={regenerate}
          onEdit={editLast}
        />
        {chat.failure && (
          <FailureBanner
            failure={chat.failure}
            countdown={chat.countdown}
            autoRetry={chat.autoRetry}
            setAutoRetry={chat.setAutoRetry}
            onRetry={chat.retryNow}
            onRegenerate={regenerate}
            onDismiss={chat.dismiss}
          />
        )}
        <Composer
          draft={draft}
          setDraft={setDraft}
          editing={editing}
          running={chat.running}
          input={composer}
          onSubmit={submit}
          onCancelEdit={() => {
            setEditing(false);
            setDraft("");
          }}
        />
      </main>
    </div>
  );
}
