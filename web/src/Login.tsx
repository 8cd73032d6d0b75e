import { useState, type FormEvent } from "react";
import { api, describeError, type Verified } from "./api";

export function Login({
  onLoggedIn,
  notice,
}: {
  onLoggedIn: (token: string, user: Verified) => void;
  notice: string | null;
}) {
  const [username, setUsername] = useState("");
  const [password, setPassword] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  const submit = async (event: FormEvent) => {
    event.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const { access_token } = await api<{ access_token: string }>("/api/auth/login", null, {
        method: "POST",
        body: { username, password },
      });
      const user = await api<Verified>("/api/auth/verify", access_token);
      onLoggedIn(access_token, user);
    } catch (caught) {
      setError(describeError(caught));
    } finally {
      setBusy(false);
    }
  };

  return (
    <main className="center">
      <form className="login" onSubmit={submit} aria-labelledby="login-title">
        <h1 id="login-title">chatq</h1>
        {notice && <p className="notice" role="status">{notice}</p>}
        <label>
          Username
          <input
            name="username"
            autoComplete="username"
            autoFocus
            required
            value={username}
            onChange={(e) => setUsername(e.target.value)}
          />
        </label>
        <label>
          Password
          <input
            name="password"
            type="password"
            autoComplete="current-password"
            required
            value={password}
            onChange={(e) => setPassword(e.target.value)}
          />
        </label>
        {error && <p className="error" role="alert">{error}</p>}
        <button type="submit" className="primary" disabled={busy}>
          {busy ? "Logging in…" : "Log in"}
        </button>
      </form>
    </main>
  );
}
