// The operator's calls: status, workers and model switches, usage (JSON and the CSV), users.
// Shapes follow api/admin.py, schemas/status.py, api/models.py, api/usage.py, api/accounts.py.
import { ApiError, api, request } from "../api";

export interface WorkerView {
  id: string;
  host: string | null;
  model: string;
  engine: string;
  engine_version: string | null;
  state: string;
  slots: number;
  free_slots: number;
  last_seen: number;
  last_seen_age_s: number;
  progress: string | null;
}

export interface QueueStatus {
  model: string;
  priority: string;
  consumer: string;
  depth: number;
  in_flight?: number;
  redelivered?: number;
  oldest_age_s?: number | null;
}

export interface ConsumerLag {
  consumer: string;
  pending: number;
}

export interface GpuStatus {
  index: number;
  name: string;
  utilization_ratio: number;
  memory_used_bytes: number;
  memory_total_bytes: number;
  temperature_celsius?: number | null;
  power_watts?: number | null;
}

export interface AdminStatus {
  status: "healthy" | "degraded";
  reasons: string[];
  time: number;
  services: {
    nats: "ok" | "down";
    telemetry: {
      status: "ok" | "stale" | "missing" | "unknown";
      snapshot_time: number | null;
      snapshot_age_s: number | null;
      interval_s: number | null;
      host: string | null;
    };
    workers: { ready: number; total: number; free_slots: number; slots: number };
  };
  workers: WorkerView[];
  queues: QueueStatus[];
  events: ConsumerLag[];
  gpus: GpuStatus[];
  notes: string[];
}

export interface ModelEntry {
  id: string;
  name: string;
  aliases: string[];
  state: string;
  workers: { id: string; state: string; progress: string; slots: number; free_slots: number }[];
  queue_depth: number | null;
  profile: boolean;
  cpu?: boolean | null;
  max_model_len?: number | null;
}

export interface SwitchAccepted {
  worker_id: string;
  profile: string;
  previous: string;
  state: "draining";
}

export type UsageGroup = "" | "day" | "user" | "model";

export interface UsageFilter {
  user: string;
  model: string;
  since: string;
  until: string;
  group_by: UsageGroup;
}

export type UsageRow = Record<string, string | number | null>;

// A column of the usage table, as the API names, heads and types it (api/usage.py).
export interface UsageColumn {
  name: string;
  label: string;
  kind: "time" | "number" | "text";
}

export interface UsageAnswer {
  columns: UsageColumn[];
  rows: UsageRow[];
  totals: { requests: number; prompt_tokens: number; completion_tokens: number; total_tokens: number };
  group_by: UsageGroup | null;
  since: string | null;
  until: string | null;
  truncated?: boolean;
}

export interface User {
  id: number;
  username: string;
  role: string;
  email: string | null;
  disabled: boolean;
  created_at: string;
  last_login_at: string | null;
}

export interface ApiKey {
  id: number;
  user_id: number;
  name: string;
  prefix: string;
  created_at: string;
  last_used_at: string | null;
  revoked_at: string | null;
}

export const adminStatus = (token: string) => api<AdminStatus>("/api/admin/status", token);

export const listModels = (token: string) =>
  api<{ models: ModelEntry[] }>("/api/models", token).then((b) => b.models);

export const switchWorker = (token: string, workerId: string, profile: string) =>
  api<SwitchAccepted>(`/api/admin/workers/${encodeURIComponent(workerId)}/model`, token, {
    method: "POST",
    body: { profile },
  });

function usageQuery(filter: UsageFilter): string {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(filter)) {
    if (value.trim()) query.set(name, value.trim());
  }
  const text = query.toString();
  return text ? `?${text}` : "";
}

export const usage = (token: string, filter: UsageFilter) =>
  api<UsageAnswer>(`/api/usage${usageQuery(filter)}`, token);

// The CSV needs the Authorization header, so it is fetched and saved from a Blob.
export async function downloadUsageCsv(token: string, filter: UsageFilter): Promise<string> {
  const response = await request(`/api/usage.csv${usageQuery(filter)}`, token);
  const disposition = response.headers.get("Content-Disposition") ?? "";
  const name = /filename="([^"]+)"/.exec(disposition)?.[1] ?? "chatq-usage.csv";
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
  return name;
}

export const listUsers = (token: string) => api<{ users: User[] }>("/api/users", token).then((b) => b.users);

export const createUser = (
  token: string,
  body: { username: string; password: string; role: string; email: string | null },
) => api<User>("/api/users", token, { method: "POST", body });

export const changeUser = (
  token: string,
  id: number,
  body: { disabled?: boolean; role?: string; password?: string; email?: string },
) => api<User>(`/api/users/${id}`, token, { method: "PATCH", body });

export const userKeys = (token: string, id: number) =>
  api<{ keys: ApiKey[] }>(`/api/users/${id}/keys`, token).then((b) => b.keys);

export const revokeKey = (token: string, id: number) =>
  api<void>(`/api/keys/${id}`, token, { method: "DELETE" });

export function isForbidden(error: unknown): boolean {
  return error instanceof ApiError && error.status === 403;
}
