// The sidebar's conversations: the list (searched by title), refreshed on demand, and the
// automatic title of a new conversation once it arrives.
import { useCallback, useEffect, useState } from "react";
import { api, describeError, isSessionError, type ConversationRow } from "../api";

export function useConversations(token: string, onError: (message: string) => void) {
  const [conversations, setConversations] = useState<ConversationRow[]>([]);
  const [search, setSearch] = useState("");

  const loadList = useCallback(
    async (q: string) => {
      const query = new URLSearchParams({ limit: "100" });
      if (q) query.set("q", q);
      try {
        const page = await api<{ conversations: ConversationRow[] }>(`/api/conversations?${query}`, token);
        setConversations(page.conversations);
      } catch (error) {
        if (!isSessionError(error)) onError(describeError(error));
      }
    },
    [token, onError],
  );

  useEffect(() => {
    const timer = setTimeout(() => void loadList(search), search ? 250 : 0);
    return () => clearTimeout(timer);
  }, [search, loadList]);

  const reload = useCallback(() => void loadList(search), [loadList, search]);

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

  // A conversation this page just started, at the top until the next reload.
  const added = useCallback((id: string, model: string) => {
    const now = new Date().toISOString();
    setConversations((list) => [
      { id, title: null, system_prompt: null, model, created_at: now, updated_at: now },
      ...list,
    ]);
  }, []);

  return { conversations, setConversations, search, setSearch, reload, awaitTitle, added };
}
