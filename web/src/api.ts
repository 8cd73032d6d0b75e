// Calls to the chatq API: JSON requests with the session's token, errors in one shape.

export interface ErrorBody {
  type?: string;
  code: string;
  message: string;
  request_id?: string;
  param?: string | null;
}

export class ApiError extends Error {
  status: number;
  code: string;
  retryAfter: number | null;

  constructor(status: number, body: ErrorBody, retryAfter: number | null = null) {
    super(body.message);
    this.status = status;
    this.code = body.code;
    this.retryAfter = retryAfter;
  }
}

const SESSION_CODES = new Set([
  "token_expired",
  "token_revoked",
  "invalid_token",
  "invalid_api_key",
  "account_disabled",
]);

// Set by the app: called when the server says the session is no longer good.
let onSessionLost: (reason: string) => void = () => undefined;
export function setSessionLostHandler(handler: (reason: string) => void): void {
  onSessionLost = handler;
}

export function isSessionError(error: unknown): boolean {
  return error instanceof ApiError && error.status === 401 && SESSION_CODES.has(error.code);
}

async function errorFrom(response: Response): Promise<ApiError> {
  const header = response.headers.get("Retry-After");
  const retryAfter = header !== null && /^\d+$/.test(header) ? Number(header) : null;
  let body: ErrorBody = { code: "http_" + response.status, message: response.statusText || "request failed" };
  try {
    const parsed = (await response.json()) as { error?: ErrorBody };
    if (parsed.error) body = parsed.error;
  } catch {
    // not JSON: keep the status text
  }
  const error = new ApiError(response.status, body, retryAfter);
  if (isSessionError(error)) onSessionLost(error.code);
  return error;
}

function headers(token: string | null, extra: Record<string, string> = {}): Record<string, string> {
  const all: Record<string, string> = { "Content-Type": "application/json", ...extra };
  if (token) all.Authorization = `Bearer ${token}`;
  return all;
}

export interface RequestOptions {
  method?: string;
  body?: unknown;
  signal?: AbortSignal;
  headers?: Record<string, string>;
}

/** The one fetch of the page: token, JSON body; any answer but 2xx throws ApiError. */
export async function request(path: string, token: string | null, init: RequestOptions = {}): Promise<Response> {
  let response: Response;
  try {
    response = await fetch(path, {
      method: init.method ?? "GET",
      headers: headers(token, init.headers),
      body: init.body === undefined ? undefined : JSON.stringify(init.body),
      signal: init.signal,
    });
  } catch (error) {
    if ((error as Error).name === "AbortError") throw error;
    throw new ApiError(0, { code: "network", message: "the server cannot be reached" });
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

/** A JSON call: request() and its decoded body (undefined for 204). */
export async function api<T>(path: string, token: string | null, init: RequestOptions = {}): Promise<T> {
  const response = await request(path, token, init);
  if (response.status === 204) return undefined as T;
  return (await response.json()) as T;
}

// --- what the API answers ------------------------------------------------------------------

export interface Verified {
  username: string;
  role: string;
  exp: number | null;
  user_id: number | null;
}

export interface ConversationRow {
  id: string;
  title: string | null;
  system_prompt: string | null;
  model: string | null;
  created_at: string;
  updated_at: string;
}

export interface StoredMessage {
  position: number;
  role: string;
  content: string;
  request_id: string;
  token_in: number | null;
  token_out: number | null;
}

export interface ConversationFull extends ConversationRow {
  messages: StoredMessage[];
}

export interface UserSettings {
  system_prompt: string | null;
  model: string | null;
  params: { temperature: number | null; max_tokens: number | null; top_p: number | null };
}

export interface Health {
  status: string;
  services: { workers: { ready: number; models: Record<string, number> } };
}

// --- errors in words -----------------------------------------------------------------------

const LIMITS: Record<string, string> = {
  rate_limit_rpm: "your requests per minute",
  rate_limit_tpm: "your tokens per minute",
  rate_limit_concurrency: "how many answers you may have running at once",
};

export function describeError(error: unknown): string {
  if (!(error instanceof ApiError)) return error instanceof Error ? error.message : String(error);
  const limit = LIMITS[error.code];
  if (limit) return `Rate limited: you have reached ${limit}.`;
  switch (error.code) {
    case "queue_full":
      return "The queue for this model is full right now.";
    case "model_not_found":
    case "model_unavailable":
      return "That model is not available: no worker serves it. Pick another model.";
    case "worker_lost":
    case "stream_gap":
      return "The worker answering was lost in the middle of the answer.";
    case "engine_error":
      return "The model failed while answering.";
    case "deadline_exceeded":
      return "No answer came in time.";
    case "conversation_busy":
      return "This conversation is still answering a previous message.";
    case "context_length_exceeded":
      return "The conversation is too long for this model: " + error.message;
    case "service_unavailable":
    case "accounts_unavailable":
    case "database_unavailable":
    case "rate_limiter_unavailable":
      return "The service is partly down: " + error.message;
    case "network":
      return "The server cannot be reached.";
    default:
      return error.message;
  }
}

export function canRegenerate(error: unknown): boolean {
  return (
    error instanceof ApiError &&
    ["worker_lost", "stream_gap", "engine_error", "deadline_exceeded", "client_too_slow"].includes(error.code)
  );
}
