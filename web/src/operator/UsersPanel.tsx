// Users: the list, a new user, role, disable and enable, a new password, and one user's
// API keys (revocable).
import { useCallback, useEffect, useState, type FormEvent } from "react";
import { describeError, isSessionError } from "../api";
import {
  changeUser,
  createUser,
  isForbidden,
  listUsers,
  revokeKey,
  userKeys,
  type ApiKey,
  type User,
} from "./adminApi";
import { when } from "./format";
import { Table } from "./Table";

export function UsersPanel({ token, me, onForbidden }: { token: string; me: string; onForbidden: () => void }) {
  const [users, setUsers] = useState<User[] | null>(null);
  const [problem, setProblem] = useState<string | null>(null);
  const [done, setDone] = useState<string | null>(null);
  const [keysOf, setKeysOf] = useState<number | null>(null);
  const [passwordOf, setPasswordOf] = useState<number | null>(null);
  const [newPassword, setNewPassword] = useState("");
  const [keys, setKeys] = useState<ApiKey[] | null>(null);
  const [username, setUsername] = useState("");
  const [password, setPassword] = useState("");
  const [role, setRole] = useState("user");
  const [email, setEmail] = useState("");
  const [busy, setBusy] = useState(false);

  const failed = useCallback(
    (error: unknown) => {
      if (isForbidden(error)) onForbidden();
      else if (!isSessionError(error)) setProblem(describeError(error));
    },
    [onForbidden],
  );

  const load = useCallback(async () => {
    try {
      setUsers(await listUsers(token));
    } catch (error) {
      failed(error);
    }
  }, [token, failed]);

  useEffect(() => {
    void load();
  }, [load]);

  const create = async (event: FormEvent) => {
    event.preventDefault();
    setBusy(true);
    setProblem(null);
    setDone(null);
    try {
      const user = await createUser(token, { username: username.trim(), password, role, email: email.trim() || null });
      setDone(`Created ${user.username} (${user.role}).`);
      setUsername("");
      setPassword("");
      setEmail("");
      setRole("user");
      await load();
    } catch (error) {
      failed(error);
    } finally {
      setBusy(false);
    }
  };

  // One PATCH of a user; the row shows the server's answer.
  const change = async (user: User, body: { disabled?: boolean; role?: string; password?: string }, said: (u: User) => string) => {
    setProblem(null);
    setDone(null);
    try {
      const changed = await changeUser(token, user.id, body);
      setUsers((list) => list?.map((u) => (u.id === changed.id ? changed : u)) ?? null);
      setDone(said(changed));
      return true;
    } catch (error) {
      failed(error);
      return false;
    }
  };

  const toggle = (user: User) =>
    change(user, { disabled: !user.disabled }, (u) => `${u.username} is ${u.disabled ? "disabled" : "enabled"}.`);

  const setUserRole = (user: User, next: string) =>
    change(user, { role: next }, (u) => `${u.username} is now ${u.role === "admin" ? "an admin" : "a user"}.`);

  const savePassword = async (event: FormEvent, user: User) => {
    event.preventDefault();
    if (await change(user, { password: newPassword }, (u) => `${u.username} has a new password.`)) {
      setPasswordOf(null);
      setNewPassword("");
    }
  };

  const revoke = async (key: ApiKey, owner: User) => {
    setProblem(null);
    setDone(null);
    try {
      await revokeKey(token, key.id);
      setKeys(await userKeys(token, owner.id));
      setDone(`Revoked ${owner.username}'s key ${key.name}.`);
    } catch (error) {
      failed(error);
    }
  };

  const showKeys = async (user: User) => {
    if (keysOf === user.id) {
      setKeysOf(null);
      return;
    }
    setKeysOf(user.id);
    setKeys(null);
    try {
      setKeys(await userKeys(token, user.id));
    } catch (error) {
      setKeysOf(null);
      failed(error);
    }
  };

  const actions = (u: User) => (
    <>
      <button
        type="button"
        className="small"
        onClick={() => void toggle(u)}
        disabled={u.username === me && !u.disabled}
        title={u.username === me ? "You cannot disable yourself here" : undefined}
      >
        {u.disabled ? "Enable" : "Disable"}
        <span className="visually-hidden"> {u.username}</span>
      </button>
      <button type="button" className="small" aria-expanded={keysOf === u.id} onClick={() => void showKeys(u)}>
        Keys<span className="visually-hidden"> of {u.username}</span>
      </button>
      <button
        type="button"
        className="small"
        aria-expanded={passwordOf === u.id}
        onClick={() => {
          setPasswordOf(passwordOf === u.id ? null : u.id);
          setNewPassword("");
        }}
      >
        Password<span className="visually-hidden"> of {u.username}</span>
      </button>
    </>
  );

  const passwordForm = (u: User) => (
    <form className="filters" aria-label={`New password for ${u.username}`} onSubmit={(e) => void savePassword(e, u)}>
      <PasswordField label="New password" value={newPassword} onChange={setNewPassword} autoFocus />
      <div className="filter-buttons">
        <button type="submit" className="primary">
          Set password
        </button>
      </div>
    </form>
  );

  const keysView = (u: User) => {
    if (keys === null) return <span className="meta">Loading keys…</span>;
    if (keys.length === 0) {
      return (
        <span className="meta" data-testid="keys">
          {u.username} has no API keys.
        </span>
      );
    }
    return (
      <Table
        testId="keys"
        className="keys"
        scroll={false}
        rows={keys}
        rowKey={(k) => k.id}
        columns={[
          { heading: "Key", cell: (k) => k.name },
          { heading: "Starts with", cell: (k) => <code>{k.prefix}…</code> },
          { heading: "Created", cell: (k) => when(k.created_at) },
          { heading: "Last used", cell: (k) => when(k.last_used_at) },
          { heading: "Revoked", testId: "key-revoked", cell: (k) => (k.revoked_at ? when(k.revoked_at) : "no") },
          {
            heading: "Actions",
            cell: (k) =>
              !k.revoked_at && (
                <button type="button" className="small" onClick={() => void revoke(k, u)}>
                  Revoke<span className="visually-hidden"> key {k.name}</span>
                </button>
              ),
          },
        ]}
      />
    );
  };

  return (
    <section id="users" aria-labelledby="users-title" className="panel">
      <h2 id="users-title">Users</h2>
      <form className="filters" onSubmit={create} aria-label="New user">
        <label>
          Username
          <input value={username} onChange={(e) => setUsername(e.target.value)} required autoComplete="off" />
        </label>
        <PasswordField label="Password" value={password} onChange={setPassword} />
        <label>
          Role
          <select value={role} onChange={(e) => setRole(e.target.value)}>
            <option value="user">user</option>
            <option value="admin">admin</option>
          </select>
        </label>
        <label>
          E-mail
          <input type="email" value={email} onChange={(e) => setEmail(e.target.value)} placeholder="optional" />
        </label>
        <div className="filter-buttons">
          <button type="submit" className="primary" disabled={busy}>
            Create user
          </button>
        </div>
      </form>
      {problem && (
        <p className="error" role="alert">
          {problem}
        </p>
      )}
      {done && (
        <p className="meta" role="status">
          {done}
        </p>
      )}
      {users === null && !problem && <p className="meta">Loading…</p>}
      {users && (
        <Table
          testId="users"
          rows={users}
          rowKey={(u) => u.id}
          rowTestId={(u) => `user-${u.username}`}
          below={(u) => [passwordOf === u.id && passwordForm(u), keysOf === u.id && keysView(u)]}
          columns={[
            { heading: "User", cell: (u) => u.username },
            {
              heading: "Role",
              cell: (u) => (
                <select
                  aria-label={`Role of ${u.username}`}
                  value={u.role}
                  disabled={u.username === me}
                  title={u.username === me ? "You cannot change your own role here" : undefined}
                  onChange={(e) => void setUserRole(u, e.target.value)}
                >
                  <option value="user">user</option>
                  <option value="admin">admin</option>
                </select>
              ),
            },
            {
              heading: "State",
              testId: "user-state",
              className: (u) => (u.disabled ? "state bad" : "state good"),
              cell: (u) => (u.disabled ? "disabled" : "active"),
            },
            { heading: "E-mail", cell: (u) => u.email ?? "—" },
            { heading: "Created", cell: (u) => when(u.created_at) },
            { heading: "Last login", cell: (u) => when(u.last_login_at) },
            { heading: "Actions", className: "actions", cell: (u) => actions(u) },
          ]}
        />
      )}
    </section>
  );
}

function PasswordField(props: { label: string; value: string; onChange: (value: string) => void; autoFocus?: boolean }) {
  return (
    <label>
      {props.label}
      <input
        type="password"
        value={props.value}
        onChange={(e) => props.onChange(e.target.value)}
        required
        autoComplete="new-password"
        autoFocus={props.autoFocus}
      />
    </label>
  );
}
