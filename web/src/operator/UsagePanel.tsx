// Usage: filters (user, model, since, until, grouping), the rows with totals, the CSV download.
import { useCallback, useEffect, useState, type FormEvent } from "react";
import { describeError, isSessionError } from "../api";
import { downloadUsageCsv, isForbidden, usage, type UsageAnswer, type UsageColumn, type UsageFilter, type UsageRow } from "./adminApi";
import { count, when } from "./format";
import { Table, type Column } from "./Table";

const EMPTY: UsageFilter = { user: "", model: "", since: "", until: "", group_by: "" };

function cell(column: UsageColumn, value: string | number | null | undefined): string {
  if (value === null || value === undefined || value === "") return column.name === "user" ? "(service key)" : "—";
  if (column.kind === "time") return when(String(value));
  if (typeof value === "number") return count(value);
  return String(value);
}

export function UsagePanel({ token, onForbidden }: { token: string; onForbidden: () => void }) {
  const [filter, setFilter] = useState<UsageFilter>(EMPTY);
  const [answer, setAnswer] = useState<UsageAnswer | null>(null);
  const [problem, setProblem] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const [downloaded, setDownloaded] = useState<string | null>(null);

  const load = useCallback(
    async (f: UsageFilter) => {
      setBusy(true);
      try {
        setAnswer(await usage(token, f));
        setProblem(null);
      } catch (error) {
        if (isForbidden(error)) onForbidden();
        else if (!isSessionError(error)) setProblem(describeError(error));
      } finally {
        setBusy(false);
      }
    },
    [token, onForbidden],
  );

  useEffect(() => {
    void load(EMPTY);
  }, [load]);

  const submit = (event: FormEvent) => {
    event.preventDefault();
    setDownloaded(null);
    void load(filter);
  };

  const download = async () => {
    setDownloaded(null);
    try {
      const name = await downloadUsageCsv(token, filter);
      setDownloaded(name);
      setProblem(null);
    } catch (error) {
      if (isForbidden(error)) onForbidden();
      else if (!isSessionError(error)) setProblem(describeError(error));
    }
  };

  const set = (name: keyof UsageFilter) => (e: { target: { value: string } }) =>
    setFilter((f) => ({ ...f, [name]: e.target.value }));

  return (
    <section id="usage" aria-labelledby="usage-title" className="panel">
      <h2 id="usage-title">Usage</h2>
      <form className="filters" onSubmit={submit} aria-label="Usage filters">
        <label>
          User
          <input value={filter.user} onChange={set("user")} placeholder="everyone" />
        </label>
        <label>
          Model
          <input value={filter.model} onChange={set("model")} placeholder="every model" />
        </label>
        <label>
          Since
          <input type="date" value={filter.since} onChange={set("since")} />
        </label>
        <label>
          Until
          <input type="date" value={filter.until} onChange={set("until")} />
        </label>
        <label>
          Group by
          <select value={filter.group_by} onChange={set("group_by")}>
            <option value="">— (each request)</option>
            <option value="day">day</option>
            <option value="user">user</option>
            <option value="model">model</option>
          </select>
        </label>
        <div className="filter-buttons">
          <button type="submit" className="primary" disabled={busy}>
            Show
          </button>
          <button type="button" onClick={() => void download()}>
            Download CSV
          </button>
        </div>
      </form>
      {problem && (
        <p className="error" role="alert">
          {problem}
        </p>
      )}
      {downloaded && (
        <p className="meta" role="status">
          Saved {downloaded}.
        </p>
      )}
      {answer && (
        <>
          <p data-testid="usage-totals" className="totals">
            <strong>{count(answer.totals.requests)}</strong> requests ·{" "}
            <strong>{count(answer.totals.prompt_tokens)}</strong> prompt tokens ·{" "}
            <strong>{count(answer.totals.completion_tokens)}</strong> completion tokens ·{" "}
            <strong>{count(answer.totals.total_tokens)}</strong> in all
            {answer.truncated && <span className="meta"> (the table shows the newest {answer.rows.length})</span>}
          </p>
          <Table
            testId="usage"
            rowHeader={false}
            rows={answer.rows}
            rowKey={(row, i) => String(row.request_id ?? i)}
            empty="No request matches."
            columns={answer.columns.map((c): Column<UsageRow> => ({
              heading: c.label,
              className: c.kind === "number" ? "num" : undefined,
              cell: (row) => cell(c, row[c.name]),
            }))}
          />
        </>
      )}
    </section>
  );
}
