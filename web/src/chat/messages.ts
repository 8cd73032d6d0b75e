// A message as the chat page shows it (the stored ones and the one streaming in).

export interface Stats {
  tokens: number;
  ttft_s: number | null;
  tokens_per_s: number | null;
}

export interface UiMessage {
  key: number;
  role: "user" | "assistant";
  content: string;
  streaming?: boolean;
  stopped?: boolean;
  failed?: boolean;
  stats?: Stats;
}

let nextKey = 1;
export const newKey = () => nextKey++;

export function lastUserMessage(messages: UiMessage[]): UiMessage | undefined {
  for (let i = messages.length - 1; i >= 0; i--) if (messages[i].role === "user") return messages[i];
  return undefined;
}
