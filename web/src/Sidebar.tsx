// Conversations, newest first: open, rename, delete, search by title; the account.
import { useState, type Dispatch, type SetStateAction } from "react";
import { Link } from "wouter";
import { api, type ConversationRow, type Verified } from "./api";

export function Sidebar({
  token,
  conversations,
  setConversations,
  activeId,
  search,
  setSearch,
  onNew,
  onOpen,
  onDeleted,
  user,
  onLogout,
}: {
  token: string;
  conversations: ConversationRow[];
  setConversations: Dispatch<SetStateAction<ConversationRow[]>>;
  activeId: string | null;
  search: string;
  setSearch: (q: string) => void;
  onNew: () => void;
  onOpen: (id: string) => void;
  onDeleted: (id: string) => void;
  user: Verified;
  onLogout: () => void;
}) {
  const [renaming, setRenaming] = useState<string | null>(null);
  const [name, setName] = useState("");
  const [problem, setProblem] = useState<string | null>(null);

  const rename = async (id: string) => {
    const title = name.trim();
    setRenaming(null);
    if (!title) return;
    try {
      const row = await api<ConversationRow>(`/api/conversations/${id}`, token, { method: "PATCH", body: { title } });
      setConversations((list) => list.map((c) => (c.id === id ? { ...c, title: row.title } : c)));
    } catch (error) {
      setProblem((error as Error).message);
    }
  };

  const remove = async (c: ConversationRow) => {
    if (!window.confirm(`Delete “${c.title ?? "New conversation"}”?`)) return;
    try {
      await api<void>(`/api/conversations/${c.id}`, token, { method: "DELETE" });
      setConversations((list) => list.filter((row) => row.id !== c.id));
      onDeleted(c.id);
    } catch (error) {
      setProblem((error as Error).message);
    }
  };

  return (
    <nav className="sidebar" aria-label="Conversations">
      <button type="button" className="primary new-chat" onClick={onNew}>
        New chat
      </button>
      <input
        type="search"
        className="search"
        placeholder="Search titles"
        aria-label="Search conversations by title"
        value={search}
        onChange={(e) => setSearch(e.target.value)}
      />
      {problem && <p className="error" role="alert">{problem}</p>}
      <ul className="conversations" data-testid="conversations">
        {conversations.map((c) => (
          <li key={c.id} className={c.id === activeId ? "active" : ""}>
            {renaming === c.id ? (
              <input
                className="rename"
                aria-label="New title"
                autoFocus
                value={name}
                onChange={(e) => setName(e.target.value)}
                onKeyDown={(e) => {
                  if (e.key === "Enter") void rename(c.id);
                  if (e.key === "Escape") setRenaming(null);
                }}
                onBlur={() => void rename(c.id)}
              />
            ) : (
              <button
                type="button"
                className="open"
                aria-current={c.id === activeId ? "page" : undefined}
                onClick={() => onOpen(c.id)}
                title={c.title ?? "New conversation"}
              >
                {c.title ?? <em>New conversation</em>}
              </button>
            )}
            <button
              type="button"
              className="icon"
              aria-label={`Rename ${c.title ?? "conversation"}`}
              onClick={() => {
                setName(c.title ?? "");
                setRenaming(c.id);
              }}
            >
              ✎
            </button>
            <button type="button" className="icon" aria-label={`Delete ${c.title ?? "conversation"}`} onClick={() => void remove(c)}>
              ✕
            </button>
          </li>
        ))}
        {conversations.length === 0 && <li className="meta">{search ? "No title matches." : "No conversations yet."}</li>}
      </ul>
      <footer className="account">
        <span>
          {user.username}
          {user.role === "admin" && (
            <>
              {" · "}
              <Link href="/admin">Operator</Link>
            </>
          )}
        </span>
        <button type="button" className="small" onClick={onLogout}>
          Log out
        </button>
      </footer>
    </nav>
  );
}
