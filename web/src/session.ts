// Who is logged in: the token the API accepts and what it says about its user.
import type { Verified } from "./api";

export interface Session {
  token: string;
  user: Verified;
}
