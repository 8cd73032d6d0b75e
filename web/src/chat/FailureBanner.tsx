// Why the last turn failed, in words, with what can be done: wait and retry, send again, regenerate.
import { canRegenerate, describeError } from "../api";
import type { Failure } from "./useChatStream";

export function FailureBanner({
  failure,
  countdown,
  autoRetry,
  setAutoRetry,
  onRetry,
  onRegenerate,
  onDismiss,
}: {
  failure: Failure;
  countdown: number | null;
  autoRetry: boolean;
  setAutoRetry: (on: boolean) => void;
  onRetry: () => void;
  onRegenerate: () => void;
  onDismiss: () => void;
}) {
  return (
    <div className="banner error" role="alert" data-testid="error">
      <span>{describeError(failure.error)}</span>
      {countdown !== null && (
        <>
          <span data-testid="countdown"> Try again in {countdown} s.</span>
          <label className="inline">
            <input type="checkbox" checked={autoRetry} onChange={(e) => setAutoRetry(e.target.checked)} />
            Retry when it ends
          </label>
        </>
      )}
      {failure.retry && countdown === null && (
        <button type="button" className="small" onClick={onRetry}>
          Send again
        </button>
      )}
      {canRegenerate(failure.error) && (
        <button type="button" className="small" onClick={onRegenerate}>
          Regenerate
        </button>
      )}
      <button type="button" className="small" aria-label="Dismiss" onClick={onDismiss}>
        ✕
      </button>
    </div>
  );
}
