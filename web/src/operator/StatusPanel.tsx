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
          <div className="table-scroll">
            <table data-testid="workers">
              <thead>
                <tr>
                  <th scope="col">Worker</th>
                  <th scope="col">Model</th>
                  <th scope="col">State</th>
                  <th scope="col">Free slots</th>
                  <th scope="col">Engine</th>
                  <th scope="col">Host</th>
                  <th scope="col">Last seen</th>
                  <th scope="col">Switch model</th>
                </tr>
              </thead>
              <tbody>
                {status.workers.map((w) => {
                  const text = workerState(w);
                  const sw = switching[w.id];
                  const note = switchNote[w.id];
                  return (
                    <tr key={w.id} data-testid={`worker-${w.id}`}>
                      <th scope="row">{w.id}</th>
                      <td data-testid="worker-model">{w.model}</td>
                      <td>
                        <span className={stateClass(text)} data-testid="worker-state">
                          {text}
                        </span>
                        {sw && <div className="meta">switching {sw.previous} → {sw.target}</div>}
                      </td>
                      <td className="num">
                        {w.free_slots} / {w.slots}
                      </td>
                      <td>
                        {w.engine}
                        {w.engine_version && <span className="meta"> {w.engine_version}</span>}
                      </td>
                      <td>{w.host ?? "—"}</td>
                      <td>{age(w.last_seen_age_s)} ago</td>
                      <td>
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
                          <button type="submit" className="small" disabled={!choice[w.id] || !!sw}>
                            Switch
                          </button>
                        </form>
                        {note && (
                          <div className={note.bad ? "error small-text" : "meta"} data-testid="switch-note">
                            {note.text}
                          </div>
                        )}
                      </td>
                    </tr>
                  );
                })}
                {status.workers.length === 0 && (
                  <tr>
                    <td colSpan={8} className="meta">
                      No worker is heard from.
                    </td>
                  </tr>
                )}
              </tbody>
            </table>
          </div>

          <h3>Models</h3>
          <div className="table-scroll">
            <table data-testid="models">
              <thead>
                <tr>
                  <th scope="col">Model</th>
                  <th scope="col">State</th>
                  <th scope="col">Workers</th>
                  <th scope="col">Waiting</th>
                  <th scope="col">Aliases</th>
                </tr>
              </thead>
              <tbody>
                {models
                  .filter((m) => m.state !== "unavailable" || m.workers.length > 0 || (m.queue_depth ?? 0) > 0)
                  .map((m) => (
                    <tr key={m.id}>
                      <th scope="row">{m.id}</th>
                      <td>{m.state}</td>
                      <td>{m.workers.map((w) => `${w.id} (${w.progress || w.state})`).join(", ") || "—"}</td>
                      <td className="num">{count(m.queue_depth)}</td>
                      <td>{m.aliases.join(", ") || "—"}</td>
                    </tr>
                  ))}
              </tbody>
            </table>
          </div>
          <p className="meta">
            {profiles.length} profiles; those no worker serves or waits for are left out of the table (the
            switch lists them all).
          </p>

          <h3>Queues</h3>
          <div className="table-scroll">
            <table data-testid="queues">
              <thead>
                <tr>
                  <th scope="col">Model</th>
                  <th scope="col">Priority</th>
                  <th scope="col">Waiting</th>
                  <th scope="col">Oldest wait</th>
                  <th scope="col">Handed out</th>
                  <th scope="col">Redelivered</th>
                </tr>
              </thead>
              <tbody>
                {queues.map((q) => (
                  <tr key={q.consumer}>
                    <th scope="row">{q.model}</th>
                    <td>{q.priority}</td>
                    <td className="num">{count(q.depth)}</td>
                    <td>{age(q.oldest_age_s)}</td>
                    <td className="num">{count(q.in_flight ?? 0)}</td>
                    <td className="num">{count(q.redelivered ?? 0)}</td>
                  </tr>
                ))}
                {queues.length === 0 && (
                  <tr>
                    <td colSpan={6} className="meta">
                      {telemetry?.status === "missing" ? "No telemetry snapshot yet." : "No queue."}
                    </td>
                  </tr>
                )}
              </tbody>
            </table>
          </div>
          {(hiddenQueues > 0 || allQueues) && (
            <p className="meta">
              {allQueues ? "Every queue is shown. " : `${hiddenQueues} empty queues of models no worker serves are hidden. `}
              <button type="button" className="small" onClick={() => setAllQueues((a) => !a)}>
                {allQueues ? "Hide idle queues" : "Show every queue"}
              </button>
            </p>
          )}

          <h3>GPUs</h3>
          <div className="table-scroll">
            <table data-testid="gpus">
              <thead>
                <tr>
                  <th scope="col">GPU</th>
                  <th scope="col">Utilisation</th>
                  <th scope="col">Memory</th>
                  <th scope="col">Temperature</th>
                  <th scope="col">Power</th>
                </tr>
              </thead>
              <tbody>
                {status.gpus.map((g) => (
                  <tr key={g.index}>
                    <th scope="row">
                      {g.index}: {g.name}
                    </th>
                    <td>
                      <meter min={0} max={1} value={g.utilization_ratio} aria-label={`GPU ${g.index} utilisation`} />{" "}
                      {Math.round(g.utilization_ratio * 100)}%
                    </td>
                    <td>
                      {bytes(g.memory_used_bytes)} / {bytes(g.memory_total_bytes)}
                    </td>
                    <td>{g.temperature_celsius != null ? `${Math.round(g.temperature_celsius)} °C` : "—"}</td>
                    <td>{g.power_watts != null ? `${Math.round(g.power_watts)} W` : "—"}</td>
                  </tr>
                ))}
                {status.gpus.length === 0 && (
                  <tr>
                    <td colSpan={5} className="meta">
                      No GPU reported.
                    </td>
                  </tr>
                )}
              </tbody>
            </table>
          </div>

          <h3>Events lag</h3>
          <div className="table-scroll">
            <table data-testid="events">
              <thead>
                <tr>
                  <th scope="col">Consumer</th>
                  <th scope="col">Events not yet read</th>
                </tr>
              </thead>
              <tbody>
                {status.events.map((e) => (
                  <tr key={e.consumer}>
                    <th scope="row">{e.consumer}</th>
                    <td className="num">{count(e.pending)}</td>
                  </tr>
                ))}
                {status.events.length === 0 && (
                  <tr>
                    <td colSpan={2} className="meta">
                      None reported.
                    </td>
                  </tr>
                )}
              </tbody>
            </table>
          </div>
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
