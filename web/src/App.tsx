// The session (token in sessionStorage: gone with the tab) and the routes.
import { useCallback, useEffect, useState } from "react";
import { Route, Switch } from "wouter";
import { api, setSessionLostHandler, type Verified } from "./api";
import { ChatPage } from "./ChatPage";
import { Login } from "./Login";

const TOKEN_KEY = "chatq.token";

export interface Session {
  token: string;
  user: Verified;
}

export function App() {
  const [session, setSession] = useState<Session | null>(null);
  const [checking, setChecking] = useState(true);
  const [notice, setNotice] = useState<string | null>(null);

  const logout = useCallback((reason: string | null) => {
    sessionStorage.removeItem(TOKEN_KEY);
    setSession(null);
    setNotice(reason);
  }, []);

  useEffect(() => {
    setSessionLostHandler((code) =>
      logout(code === "token_expired" ? "Your session expired: log in again." : "Please log in again."),
    );
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) {
      setChecking(false);
      return;
    }
    api<Verified>("/api/auth/verify", token)
      .then((user) => setSession({ token, user }))
      .catch(() => sessionStorage.removeItem(TOKEN_KEY))
      .finally(() => setChecking(false));
  }, [logout]);

  // Back to the login page when the token runs out, even while nothing is sent.
  useEffect(() => {
    if (!session?.user.exp) return;
    const ms = session.user.exp * 1000 - Date.now();
    const timer = setTimeout(() => logout("Your session expired: log in again."), Math.max(0, ms));
    return () => clearTimeout(timer);
  }, [session, logout]);

  const loggedIn = (token: string, user: Verified) => {
    sessionStorage.setItem(TOKEN_KEY, token);
    setNotice(null);
    setSession({ token, user });
  };

  if (checking) return <main className="center">Loading…</main>;
  if (!session) return <Login onLoggedIn={loggedIn} notice={notice} />;
  return (
    <Switch>
      <Route path="/admin">
        <OperatorPage session={session} />
      </Route>
      <Route path="/c/:id">
        {(params) => <ChatPage session={session} conversationId={params.id} onLogout={() => logout(null)} />}
      </Route>
      <Route>
        <ChatPage session={session} conversationId={null} onLogout={() => logout(null)} />
      </Route>
    </Switch>
  );
}

function OperatorPage({ session }: { session: Session }) {
  const admin = session.user.role === "admin";
  return (
    <main className="center" data-testid="operator-page">
      <h1>Operator</h1>
      {admin ? (
        <p>The operator page is not built yet.</p>
      ) : (
        <p role="alert">This page is for administrators. Your account ({session.user.username}) is not one.</p>
      )}
      <p>
        <a href="/">Back to the chat</a>
      </p>
    </main>
  );
}
