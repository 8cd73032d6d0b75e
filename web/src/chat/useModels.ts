// The models and how many workers serve each, refreshed every 10 s while the page is open.
import { useEffect, useState } from "react";
import { api, type Health } from "../api";

export function useModels(token: string, onFirst: (model: string) => void) {
  const [models, setModels] = useState<string[]>([]);
  const [ready, setReady] = useState<Record<string, number>>({});

  useEffect(() => {
    let stop = false;
    const refresh = async () => {
      try {
        const list = await api<{ data: { id: string }[] }>("/v1/models", token);
        const health = await api<Health>("/health", null);
        if (stop) return;
        setModels(list.data.map((m) => m.id));
        setReady(health.services.workers.models ?? {});
        if (list.data[0]) onFirst(list.data[0].id);
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
  }, [token, onFirst]);

  return { models, ready };
}
