// The bar over the messages: the sidebar's button (narrow screens), the model picker and the
// settings that go with a message.
import type { ChatSettings } from "./useChatSettings";

export function TopBar({
  settings,
  models,
  ready,
  sidebarOpen,
  onToggleSidebar,
  onSaveDefaults,
}: {
  settings: ChatSettings;
  models: string[];
  ready: Record<string, number>;
  sidebarOpen: boolean;
  onToggleSidebar: () => void;
  onSaveDefaults: () => void;
}) {
  return (
    <header className="topbar">
      <button type="button" className="menu" aria-label="Conversations" aria-expanded={sidebarOpen} onClick={onToggleSidebar}>
        ☰
      </button>
      <label className="model-picker">
        <span className="visually-hidden">Model</span>
        <select value={settings.model} onChange={(e) => settings.setModel(e.target.value)} aria-label="Model">
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
            <textarea rows={3} value={settings.systemPrompt} onChange={(e) => settings.setSystemPrompt(e.target.value)} />
          </label>
          <div className="row">
            <label>
              Temperature
              <input
                type="number"
                min={0}
                max={2}
                step={0.1}
                value={settings.temperature}
                placeholder="default"
                onChange={(e) => settings.setTemperature(e.target.value)}
              />
            </label>
            <label>
              Max tokens
              <input
                type="number"
                min={1}
                step={1}
                value={settings.maxTokens}
                placeholder="default"
                onChange={(e) => settings.setMaxTokens(e.target.value)}
              />
            </label>
          </div>
          <button type="button" onClick={onSaveDefaults}>
            Save as my defaults
          </button>
        </div>
      </details>
    </header>
  );
}
