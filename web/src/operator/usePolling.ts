// Calls `load` now and every `everyMs` while the tab is visible; nothing while it is hidden,
// and once more as soon as it shows again. A call never overlaps the previous one.
import { useCallback, useEffect, useRef } from "react";

export function usePolling(load: () => Promise<void>, everyMs: number): () => void {
  const latest = useRef(load);
  latest.current = load;
  const running = useRef(false);

  const tick = useCallback(async () => {
    if (running.current) return;
    running.current = true;
    try {
      await latest.current();
    } finally {
      running.current = false;
    }
  }, []);

  useEffect(() => {
    let timer: ReturnType<typeof setInterval> | null = null;
    const start = () => {
      if (timer !== null || document.visibilityState !== "visible") return;
      void tick();
      timer = setInterval(() => void tick(), everyMs);
    };
    const stop = () => {
      if (timer !== null) clearInterval(timer);
      timer = null;
    };
    const onVisibility = () => (document.visibilityState === "visible" ? start() : stop());
    document.addEventListener("visibilitychange", onVisibility);
    start();
    return () => {
      document.removeEventListener("visibilitychange", onVisibility);
      stop();
    };
  }, [tick, everyMs]);

  return () => void tick();
}
