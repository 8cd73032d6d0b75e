// The session (token in sessionStorage: gone with the tab) and the routes.
import { lazy, Suspense, useCallback, useEffect, useState } from "react";
import { Route, Switch } from "wouter";
import { api, request, setSessionLostHandler, type Verified } from "./api";
import { ChatPage } from "./chat/ChatPage";
import { Login } from "./Login";
import type { Session } from "./session";

// The operator page is its own chunk: the chat page does not load it.
const OperatorPage = lazy(() => import("./operator/OperatorPage").then((m) => ({ default: m.OperatorPage })));

const TOKEN_KEY = "chatq.token";

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

  // The server ends the token too (POST /api/auth/logout), so a copy of it stops working.
  const signOut = () => {
    if (session) {
      request("/api/auth/logout", session.token, { method: "POST" }).catch(() => undefined);
    }
    logout(null);
  };

  if (checking) return <main className="center">Loading…</main>;
  if (!session) return <Login onLoggedIn={loggedIn} notice={notice} />;
  return (
    <Switch>
      <Route path="/admin">
        <Suspense fallback={<main className="center">Loading…</main>}>
          <OperatorPage session={session} />
        </Suspense>
      </Route>
      <Route path="/c/:id">
        {(params) => <ChatPage session={session} conversationId={params.id} onLogout={signOut} />}
      </Route>
      <Route>
        <ChatPage session={session} conversationId={null} onLogout={signOut} />
      </Route>
    </Switch>
  );
}
