// Health, workers (with the model switch), models, queues, events lag and GPUs, refreshed
// every 2 s while the tab is visible.
import { useCallback, useState } from "react";
import { describeError, isSessionError } from "../api";
import {
  adminStatus,
  isForbidden,
  listModels,
  switchWorker,
  type AdminStatus,
  type ModelEntry,
  type WorkerView,
} from "./adminApi";
import { age, bytes, count } from "./format";
import { Table } from "./Table";
import { usePolling } from "./usePolling";

const EVERY_MS = 2000;

interface Switching {
  target: string;
  previous: string;
}

// What a worker is doing, in the worker's own words when it gives them.
function workerState(w: WorkerView): string {
  return w.progress && w.progress !== w.state ? w.progress : w.state;
}

function stateClass(text: string): string {
  if (text.startsWith("failed")) return "state bad";
  if (text === "ready") return "state good";
  return "state busy";
}

function switchRefusal(error: unknown): string {
  const message = describeError(error);
  const code = (error as { code?: string }).code;
  switch (code) {
    case "unknown_profile":
      return `No such profile: ${message}`;
    case "same_model":
      return `Already serving that model: ${message}`;
    case "already_switching":
      return `A switch is already under way: ${message}`;
    case "does_not_fit":
      return `The model does not fit on this worker's hardware: ${message}`;
    case "not_found":
      return `That worker is gone: ${message}`;
    default:
      return message;
  }
}

export function StatusPanel({ token, onForbidden }: { token: string; onForbidden: () => void }) {
  const [status, setStatus] = useState<AdminStatus | null>(null);
  const [models, setModels] = useState<ModelEntry[]>([]);
  const [problem, setProblem] = useState<string | null>(null);
  const [choice, setChoice] = useState<Record<string, string>>({});
  const [switching, setSwitching] = useState<Record<string, Switching>>({});
  const [switchNote, setSwitchNote] = useState<Record<string, { text: string; bad: boolean }>>({});
  const [allQueues, setAllQueues] = useState(false);

  const load = useCallback(async () => {
    try {
      const [s, m] = await Promise.all([adminStatus(token), listModels(token)]);
      setStatus(s);
      setModels(m);
      setProblem(null);
      // A switch is over when its worker is ready again: on the new model, or back on the old.
      setSwitching((current) => {
        const next = { ...current };
        for (const [id, sw] of Object.entries(current)) {
          const w = s.workers.find((x) => x.id === id);
          if (!w || w.state !== "ready") continue;
          if (w.model === sw.target || (w.progress ?? "").startsWith("failed")) {
            delete next[id];
            const failed = (w.progress ?? "").startsWith("failed");
            setSwitchNote((notes) => ({
              ...notes,
              [id]: failed
                ? { text: `The switch to ${sw.target} ${w.progress}; back on ${w.model}.`, bad: true }
                : { text: `Now serving ${sw.target}.`, bad: false },
            }));
          }
        }
        return next;
      });
    } catch (error) {
      if (isForbidden(error)) onForbidden();
      else if (!isSessionError(error)) setProblem(describeError(error));
    }
  }, [token, onForbidden]);

  const refresh = usePolling(load, EVERY_MS);

  const profiles = models.filter((m) => m.profile);

  const startSwitch = async (worker: WorkerView) => {
    const profile = choice[worker.id] ?? "";
    if (!profile) return;
    setSwitchNote((notes) => ({ ...notes, [worker.id]: { text: `Asking ${worker.id} to load ${profile}…`, bad: false } }));
    try {
      const accepted = await switchWorker(token, worker.id, profile);
      setSwitching((s) => ({ ...s, [worker.id]: { target: accepted.profile, previous: accepted.previous } }));
      setSwitchNote((notes) => ({
        ...notes,
        [worker.id]: { text: `Switching from ${accepted.previous} to ${accepted.profile}.`, bad: false },
      }));
      refresh();
    } catch (error) {
      if (isForbidden(error)) onForbidden();
      else setSwitchNote((notes) => ({ ...notes, [worker.id]: { text: switchRefusal(error), bad: true } }));
    }
  };

  const telemetry = status?.services.telemetry;
  // Idle queues of models no worker serves are noise unless asked for.
  const served = new Set(status?.workers.map((w) => w.model) ?? []);
  const queues = (status?.queues ?? []).filter(
    (q) => allQueues || served.has(q.model) || q.depth > 0 || (q.in_flight ?? 0) > 0,
  );
  const hiddenQueues = (status?.queues.length ?? 0) - queues.length;
  const switchCell = (w: WorkerView) => {
    const note = switchNote[w.id];
    return (
      <>
        <form
          className="switch"
          onSubmit={(e) => {
            e.preventDefault();
            void startSwitch(w);
          }}
        >
          <select
            aria-label={`New model for ${w.id}`}
            value={choice[w.id] ?? ""}
            onChange={(e) => setChoice((c) => ({ ...c, [w.id]: e.target.value }))}
          >
            <option value="">Profile…</option>
            {profiles
              .filter((p) => p.id !== w.model)
              .map((p) => (
                <option key={p.id} value={p.id}>
                  {p.id}
                  {p.cpu ? " (CPU)" : ""}
                </option>
              ))}
          </select>
          <button type="submit" className="small" disabled={!choice[w.id] || !!switching[w.id]}>
            Switch
          </button>
        </form>
        {note && (
          <div className={note.bad ? "error small-text" : "meta"} data-testid="switch-note">
            {note.text}
          </div>
        )}
      </>
    );
  };

  return (
    <section id="status" aria-labelledby="status-title" className="panel">
      <h2 id="status-title">Status</h2>
      {problem && (
        <p className="error" role="alert">
          Cannot read the status: {problem}
        </p>
      )}
      {!status && !problem && <p className="meta">Loading…</p>}
      {status && (
        <>
          <div className="health" role="status" data-testid="health">
            <span className={status.status === "healthy" ? "badge good" : "badge bad"}>{status.status}</span>
            <span>
              {status.services.workers.ready} of {status.services.workers.total} workers ready,{" "}
              {status.services.workers.free_slots} of {status.services.workers.slots} slots free · NATS{" "}
              {status.services.nats} · telemetry {telemetry?.status}
              {telemetry?.snapshot_age_s != null && `, snapshot ${age(telemetry.snapshot_age_s)} old`}
            </span>
          </div>
          {status.reasons.length > 0 && (
            <ul className="reasons">
              {status.reasons.map((r) => (
                <li key={r}>{r}</li>
              ))}
            </ul>
          )}

          <h3>Workers</h3>
          <Table
            testId="workers"
            rows={status.workers}
            rowKey={(w) => w.id}
            rowTestId={(w) => `worker-${w.id}`}
            empty="No worker is heard from."
            columns={[
              { heading: "Worker", cell: (w) => w.id },
              { heading: "Model", cell: (w) => w.model, testId: "worker-model" },
              {
                heading: "State",
                cell: (w) => {
                  const text = workerState(w);
                  const sw = switching[w.id];
                  return (
                    <>
                      <span className={stateClass(text)} data-testid="worker-state">
                        {text}
                      </span>
                      {sw && <div className="meta">switching {sw.previous} → {sw.target}</div>}
                    </>
                  );
                },
              },
              { heading: "Free slots", className: "num", cell: (w) => `${w.free_slots} / ${w.slots}` },
              {
                heading: "Engine",
                cell: (w) => (
                  <>
                    {w.engine}
                    {w.engine_version && <span className="meta"> {w.engine_version}</span>}
                  </>
                ),
              },
              { heading: "Host", cell: (w) => w.host ?? "—" },
              { heading: "Last seen", cell: (w) => `${age(w.last_seen_age_s)} ago` },
              { heading: "Switch model", cell: (w) => switchCell(w) },
            ]}
          />

          <h3>Models</h3>
          <Table
            testId="models"
            rows={models.filter((m) => m.state !== "unavailable" || m.workers.length > 0 || (m.queue_depth ?? 0) > 0)}
            rowKey={(m) => m.id}
            columns={[
              { heading: "Model", cell: (m) => m.id },
              { heading: "State", cell: (m) => m.state },
              {
                heading: "Workers",
                cell: (m) => m.workers.map((w) => `${w.id} (${w.progress || w.state})`).join(", ") || "—",
              },
              { heading: "Waiting", className: "num", cell: (m) => count(m.queue_depth) },
              { heading: "Aliases", cell: (m) => m.aliases.join(", ") || "—" },
            ]}
          />
          <p className="meta">
            {profiles.length} profiles; those no worker serves or waits for are left out of the table (the
            switch lists them all).
          </p>

          <h3>Queues</h3>
          <Table
            testId="queues"
            rows={queues}
            rowKey={(q) => q.consumer}
            empty={telemetry?.status === "missing" ? "No telemetry snapshot yet." : "No queue."}
            columns={[
              { heading: "Model", cell: (q) => q.model },
              { heading: "Priority", cell: (q) => q.priority },
              { heading: "Waiting", className: "num", cell: (q) => count(q.depth) },
              { heading: "Oldest wait", cell: (q) => age(q.oldest_age_s) },
              { heading: "Handed out", className: "num", cell: (q) => count(q.in_flight ?? 0) },
              { heading: "Redelivered", className: "num", cell: (q) => count(q.redelivered ?? 0) },
            ]}
          />
          {(hiddenQueues > 0 || allQueues) && (
            <p className="meta">
              {allQueues ? "Every queue is shown. " : `${hiddenQueues} empty queues of models no worker serves are hidden. `}
              <button type="button" className="small" onClick={() => setAllQueues((a) => !a)}>
                {allQueues ? "Hide idle queues" : "Show every queue"}
              </button>
            </p>
          )}

          <h3>GPUs</h3>
          <Table
            testId="gpus"
            rows={status.gpus}
            rowKey={(g) => g.index}
            empty="No GPU reported."
            columns={[
              { heading: "GPU", cell: (g) => `${g.index}: ${g.name}` },
              {
                heading: "Utilisation",
                cell: (g) => (
                  <>
                    <meter min={0} max={1} value={g.utilization_ratio} aria-label={`GPU ${g.index} utilisation`} />{" "}
                    {Math.round(g.utilization_ratio * 100)}%
                  </>
                ),
              },
              { heading: "Memory", cell: (g) => `${bytes(g.memory_used_bytes)} / ${bytes(g.memory_total_bytes)}` },
              {
                heading: "Temperature",
                cell: (g) => (g.temperature_celsius != null ? `${Math.round(g.temperature_celsius)} °C` : "—"),
              },
              { heading: "Power", cell: (g) => (g.power_watts != null ? `${Math.round(g.power_watts)} W` : "—") },
            ]}
          />

          <h3>Events lag</h3>
          <Table
            testId="events"
            rows={status.events}
            rowKey={(e) => e.consumer}
            empty="None reported."
            columns={[
              { heading: "Consumer", cell: (e) => e.consumer },
              { heading: "Events not yet read", className: "num", cell: (e) => count(e.pending) },
            ]}
          />
          {status.notes.length > 0 && (
            <ul className="meta">
              {status.notes.map((n) => (
                <li key={n}>{n}</li>
              ))}
            </ul>
          )}
        </>
      )}
    </section>
  );
}
