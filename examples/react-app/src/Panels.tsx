import type { ModelStatus } from "./api";
import { secondsLeft, useNow } from "./useNow";

/** Where a running request stands. */
export type Phase =
  | { kind: "idle" }
  | { kind: "sending"; startedAt: number }
  | { kind: "queued"; startedAt: number; position: number | null }
  | { kind: "loading"; startedAt: number; etaS: number | null; deadline: number | null }
  | { kind: "generating"; startedAt: number };

/** The progress line: always in the page (an empty live region), so screen readers announce changes. */
export function StatusArea({ phase }: { phase: Phase }) {
  const now = useNow(phase.kind !== "idle");
  let text = "";
  let detail = "";
  let progress: { value: number; max: number } | null = null;
  if (phase.kind !== "idle") {
    const elapsed = Math.max(0, Math.floor((now - phase.startedAt) / 1000));
    detail = `${elapsed} s elapsed`;
    if (phase.kind === "sending") {
      text = "Sending the request…";
    } else if (phase.kind === "queued") {
      // The proxy's position: 0 when a slot was free, else the place in line (1 = next).
      if (phase.position === null || phase.position <= 0) text = "Starting…";
      else if (phase.position === 1) text = "Queued: you are next in line";
      else text = `Queued: number ${phase.position} in line`;
    } else if (phase.kind === "loading") {
      if (phase.deadline !== null && phase.etaS !== null) {
        const left = secondsLeft(phase.deadline, now);
        text =
          left > 0
            ? `Warming up the model, about ${left} s left`
            : "Warming up the model, almost ready…";
        progress = { value: Math.min(phase.etaS, phase.etaS - left), max: phase.etaS };
      } else {
        text = "Warming up the model…";
      }
    } else {
      text = "Generating the image…";
    }
  }
  return (
    <div
      className={`status ${phase.kind}`}
      role="status"
      aria-live="polite"
      data-testid="status-area"
      data-phase={phase.kind}
      hidden={phase.kind === "idle"}
    >
      {phase.kind !== "idle" && (
        <>
          <span className="spinner" aria-hidden="true" />
          <span className="status-text">{text}</span>
          <span className="status-detail">{detail}</span>
          {progress && (
            <progress className="eta" value={progress.value} max={progress.max} aria-label="Warm-up progress" />
          )}
        </>
      )}
    </div>
  );
}

/** How the page names each of the proxy's error codes; the proxy's message follows as written. */
const TITLES: Record<string, string> = {
  validation_error: "Check the settings",
  payload_too_large: "Request too large",
  unauthorized: "Not authorised",
  rate_limited: "Rate limited",
  quota_exceeded: "Quota reached",
  model_loading: "The model is still loading",
  busy: "The service is busy",
  upstream_timeout: "The model took too long",
  upstream_auth: "The service cannot reach the model",
  upstream_not_found: "Model not found",
  upstream_credits: "Out of credits",
  upstream_rejected: "The model refused these settings",
  upstream_error: "The model failed",
  network: "Cannot reach the service",
  bad_response: "Unexpected answer",
};

export interface ShownError {
  code: string;
  message: string;
  /** When the proxy says a retry may succeed (ms since epoch), from `retry_after`. */
  retryAt: number | null;
}

export function ErrorArea({ error, onDismiss }: { error: ShownError | null; onDismiss: () => void }) {
  const now = useNow(error?.retryAt != null, 500);
  if (!error) return <div data-testid="error-area" hidden />;
  const title = TITLES[error.code] ?? "Something went wrong";
  let hint: string | null = null;
  if (error.retryAt !== null) {
    const left = secondsLeft(error.retryAt, now);
    hint = left > 0 ? `try again in ${left} s` : "you can try again now";
  }
  return (
    <div className="panel error" role="alert" data-testid="error-area" data-code={error.code}>
      <p className="error-title">
        <strong>{title}</strong>
        {hint && <span data-testid="retry-hint">: {hint}</span>}
      </p>
      <p className="error-message" data-testid="error-message">
        {error.message}
      </p>
      <button type="button" className="link" onClick={onDismiss}>
        Dismiss
      </button>
    </div>
  );
}

export function ModelBadge({ status }: { status: ModelStatus | null }) {
  if (!status || status.state === "unknown") return null;
  const labels = {
    ready: "Model ready",
    loading: status.eta_s !== null ? `Model warming up (about ${Math.ceil(status.eta_s)} s)` : "Model warming up",
    unavailable: "Model unavailable",
  } as const;
  return (
    <span className={`badge ${status.state}`} data-testid="model-status" title={status.message ?? undefined}>
      {labels[status.state]}
    </span>
  );
}
