// What goes with a message: model, system prompt, temperature, max tokens; the user's saved
// defaults fill them in and "Save as my defaults" stores them.
import { useCallback, useEffect, useState, type RefObject } from "react";
import { api, type UserSettings } from "../api";
import type { ChatBody } from "../stream";

export type ChatParams = Omit<ChatBody, "message" | "conversation_id" | "replace_last">;

export function useChatSettings(token: string, currentId: RefObject<string | null>) {
  const [defaults, setDefaults] = useState<UserSettings | null>(null);
  const [systemPrompt, setSystemPrompt] = useState("");
  const [model, setModel] = useState("");
  const [temperature, setTemperature] = useState("");
  const [maxTokens, setMaxTokens] = useState("");

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
  }, [token, currentId]);

  // A model to fall back on when none is picked yet.
  const offerModel = useCallback((first: string) => setModel((m) => m || first), []);

  const params = (): ChatParams => {
    const body: ChatParams = {};
    if (model) body.model = model;
    const t = Number.parseFloat(temperature);
    if (temperature.trim() && Number.isFinite(t)) body.temperature = t;
    const n = Number.parseInt(maxTokens, 10);
    if (maxTokens.trim() && Number.isFinite(n) && n > 0) body.max_tokens = n;
    if (systemPrompt.trim()) body.system_prompt = systemPrompt;
    return body;
  };

  /** Stores the fields as the user's defaults; throws ApiError. */
  const saveDefaults = async () => {
    const saved = await api<UserSettings>("/api/me/settings", token, {
      method: "PUT",
      body: {
        system_prompt: systemPrompt || null,
        model: model || null,
        params: {
          temperature: temperature.trim() ? Number.parseFloat(temperature) : null,
          max_tokens: maxTokens.trim() ? Number.parseInt(maxTokens, 10) : null,
          top_p: defaults?.params.top_p ?? null,
        },
      },
    });
    setDefaults(saved);
  };

  const resetPrompt = () => setSystemPrompt(defaults?.system_prompt ?? "");

  return {
    defaults,
    systemPrompt,
    setSystemPrompt,
    model,
    setModel,
    offerModel,
    temperature,
    setTemperature,
    maxTokens,
    setMaxTokens,
    params,
    saveDefaults,
    resetPrompt,
  };
}

export type ChatSettings = ReturnType<typeof useChatSettings>;
