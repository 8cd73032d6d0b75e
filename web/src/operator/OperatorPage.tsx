// The operator page at /admin: status (workers, queues, GPUs), usage, users. Admins only:
// anyone else sees the refusal and the page calls nothing.
import { useState } from "react";
import { Link } from "wouter";
import type { Session } from "../session";
import { StatusPanel } from "./StatusPanel";
import { UsagePanel } from "./UsagePanel";
import { UsersPanel } from "./UsersPanel";

export function OperatorPage({ session }: { session: Session }) {
  // The API's own word wins: a 403 (say, the role changed since login) refuses too.
  const [refused, setRefused] = useState(session.user.role !== "admin");
  const refuse = () => setRefused(true);

  return (
    <div className="operator" data-testid="operator-page">
      <header className="operator-bar">
        <h1>Operator</h1>
        {!refused && (
          <nav aria-label="Sections" className="operator-nav">
            <a href="#status">Status</a>
            <a href="#usage">Usage</a>
            <a href="#users">Users</a>
          </nav>
        )}
        <span className="operator-account meta">{session.user.username}</span>
        <Link href="/">Back to the chat</Link>
      </header>
      {refused ? (
        <main className="operator-main">
          <p role="alert" className="refusal" data-testid="operator-refusal">
            This page is for administrators. Your account ({session.user.username}) is not one.
          </p>
        </main>
      ) : (
        <main className="operator-main">
          <StatusPanel token={session.token} onForbidden={refuse} />
          <UsagePanel token={session.token} onForbidden={refuse} />
          <UsersPanel token={session.token} me={session.user.username} onForbidden={refuse} />
        </main>
      )}
    </div>
  );
}
