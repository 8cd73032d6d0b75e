// Users: the list, a new user, disable and enable, and one user's API keys.
import { Fragment, useCallback, useEffect, useState, type FormEvent } from "react";
import { describeError, isSessionError } from "../api";
import { changeUser, createUser, isForbidden, listUsers, userKeys, type ApiKey, type User } from "./adminApi";
import { when } from "./format";

export function UsersPanel({ token, me, onForbidden }: { token: string; me: string; onForbidden: () => void }) {
  const [users, setUsers] = useState<User[] | null>(null);
  const [problem, setProblem] = useState<string | null>(null);
  const [done, setDone] = useState<string | null>(null);
  const [keysOf, setKeysOf] = useState<number | null>(null);
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

  const toggle = async (user: User) => {
    setProblem(null);
    setDone(null);
    try {
      const changed = await changeUser(token, user.id, { disabled: !user.disabled });
      setUsers((list) => list?.map((u) => (u.id === changed.id ? changed : u)) ?? null);
      setDone(`${changed.username} is ${changed.disabled ? "disabled" : "enabled"}.`);
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

  return (
    <section id="users" aria-labelledby="users-title" className="panel">
      <h2 id="users-title">Users</h2>
      <form className="filters" onSubmit={create} aria-label="New user">
        <label>
          Username
          <input value={username} onChange={(e) => setUsername(e.target.value)} required autoComplete="off" />
        </label>
        <label>
          Password
          <input
            type="password"
            value={password}
            onChange={(e) => setPassword(e.target.value)}
            required
            autoComplete="new-password"
          />
        </label>
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
        <div className="table-scroll">
          <table data-testid="users">
            <thead>
              <tr>
                <th scope="col">User</th>
                <th scope="col">Role</th>
                <th scope="col">State</th>
                <th scope="col">E-mail</th>
                <th scope="col">Created</th>
                <th scope="col">Last login</th>
                <th scope="col">Actions</th>
              </tr>
            </thead>
            <tbody>
              {users.map((u) => (
                <Fragment key={u.id}>
                  <tr data-testid={`user-${u.username}`}>
                    <th scope="row">{u.username}</th>
                    <td>{u.role}</td>
                    <td data-testid="user-state" className={u.disabled ? "state bad" : "state good"}>
                      {u.disabled ? "disabled" : "active"}
                    </td>
                    <td>{u.email ?? "—"}</td>
                    <td>{when(u.created_at)}</td>
                    <td>{when(u.last_login_at)}</td>
                    <td className="actions">
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
                      <button
                        type="button"
                        className="small"
                        aria-expanded={keysOf === u.id}
                        onClick={() => void showKeys(u)}
                      >
                        Keys<span className="visually-hidden"> of {u.username}</span>
                      </button>
                    </td>
                  </tr>
                  {keysOf === u.id && (
                    <tr className="keys-row">
                      <td colSpan={7}>
                        {keys === null ? (
                          <span className="meta">Loading keys…</span>
                        ) : keys.length === 0 ? (
                          <span className="meta" data-testid="keys">
                            {u.username} has no API keys.
                          </span>
                        ) : (
                          <table data-testid="keys" className="keys">
                            <thead>
                              <tr>
                                <th scope="col">Key</th>
                                <th scope="col">Starts with</th>
                                <th scope="col">Created</th>
                                <th scope="col">Last used</th>
                                <th scope="col">Revoked</th>
                              </tr>
                            </thead>
                            <tbody>
                              {keys.map((k) => (
                                <tr key={k.id}>
                                  <th scope="row">{k.name}</th>
                                  <td>
                                    <code>{k.prefix}…</code>
                                  </td>
                                  <td>{when(k.created_at)}</td>
                                  <td>{when(k.last_used_at)}</td>
                                  <td>{k.revoked_at ? when(k.revoked_at) : "no"}</td>
                                </tr>
                              ))}
                            </tbody>
                          </table>
                        )}
                      </td>
                    </tr>
                  )}
                </Fragment>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}
