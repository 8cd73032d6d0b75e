// The operator page's one table: a heading per column, the first cell of a row heads it,
// a line in words when there is no row, and optional full-width rows under a row.
import { Fragment, type ReactNode } from "react";

export interface Column<R> {
  heading: string;
  cell: (row: R) => ReactNode;
  // Numbers are right-aligned ("num"); a function gives the class a row's value calls for.
  className?: string | ((row: R) => string | undefined);
  testId?: string;
}

export function Table<R>({
  testId,
  columns,
  rows,
  rowKey,
  rowTestId,
  empty,
  below,
  className,
  scroll = true,
  rowHeader = true,
}: {
  testId: string;
  columns: Column<R>[];
  rows: R[];
  rowKey: (row: R, index: number) => string | number;
  rowTestId?: (row: R) => string;
  // Shown in the table when there is no row (none: an empty body).
  empty?: ReactNode;
  // Rows to show under a row across every column (a form, a nested table); null: none.
  below?: (row: R) => ReactNode[];
  className?: string;
  scroll?: boolean;
  // The first cell of a row heads it (<th scope="row">).
  rowHeader?: boolean;
}) {
  const table = (
    <table data-testid={testId} className={className}>
      <thead>
        <tr>
          {columns.map((c) => (
            <th key={c.heading} scope="col">
              {c.heading}
            </th>
          ))}
        </tr>
      </thead>
      <tbody>
        {rows.map((row, index) => {
          const extra = (below?.(row) ?? []).filter((node) => node != null && node !== false);
          return (
            <Fragment key={rowKey(row, index)}>
              <tr data-testid={rowTestId?.(row)}>
                {columns.map((c, i) => {
                  const heads = rowHeader && i === 0;
                  const Cell = heads ? "th" : "td";
                  return (
                    <Cell
                      key={c.heading}
                      scope={heads ? "row" : undefined}
                      className={typeof c.className === "function" ? c.className(row) : c.className}
                      data-testid={c.testId}
                    >
                      {c.cell(row)}
                    </Cell>
                  );
                })}
              </tr>
              {extra.map((node, i) => (
                <tr key={i} className="keys-row">
                  <td colSpan={columns.length}>{node}</td>
                </tr>
              ))}
            </Fragment>
          );
        })}
        {rows.length === 0 && empty !== undefined && (
          <tr>
            <td colSpan={columns.length} className="meta">
              {empty}
            </td>
          </tr>
        )}
      </tbody>
    </table>
  );
  return scroll ? <div className="table-scroll">{table}</div> : table;
}
