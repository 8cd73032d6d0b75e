// Where a message is written: Enter sends, Shift+Enter is a new line, Escape stops the answer
// or cancels an edit; the draft survives a reload of the tab.
import type { KeyboardEvent, RefObject } from "react";

export const DRAFT_KEY = "chatq.draft";

export function Composer({
  draft,
  setDraft,
  editing,
  running,
  input,
  onSubmit,
  onCancelEdit,
}: {
  draft: string;
  setDraft: (text: string) => void;
  editing: boolean;
  running: AbortController | null;
  input: RefObject<HTMLTextAreaElement | null>;
  onSubmit: () => void;
  onCancelEdit: () => void;
}) {
  const onKeyDown = (event: KeyboardEvent<HTMLTextAreaElement>) => {
    if (event.key === "Enter" && !event.shiftKey && !event.nativeEvent.isComposing) {
      event.preventDefault();
      onSubmit();
    } else if (event.key === "Escape") {
      if (running) running.abort();
      else if (editing) onCancelEdit();
    }
  };

  return (
    <form
      className="composer"
      onSubmit={(e) => {
        e.preventDefault();
        onSubmit();
      }}
    >
      {editing && <p className="meta">Editing your last message: sending replaces it and its answer. Escape cancels.</p>}
      <label className="visually-hidden" htmlFor="composer">
        Message
      </label>
      <textarea
        id="composer"
        ref={input}
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
  );
}
