/**
 * Talking to the sdproxy service (docs/architecture.md, section "proxy").
 *
 * The page never holds a Hugging Face token: the proxy does. The page sends the generation
 * parameters and receives the image, its seed and its timings.
 *
 * - `POST /generate/stream` answers `text/event-stream`: `queued {position}`, `loading {eta_s}`,
 *   `generating {}`, then `image` (the JSON answer) or `error` (the error body).
 * - `POST /generate` with `Accept: application/json` answers the same JSON in one piece; the page
 *   falls back to it when streaming is unavailable.
 * - Every error is `{"error": {"code", "message", "retry_after"?}}`.
 */
import { SseParser } from "./sse";

/** The proxy's base URL, fixed at build time. Empty means "the origin that served this page". */
export const API_URL: string = (import.meta.env.VITE_API_URL ?? "").replace(/\/+$/, "");

/** Bounds the proxy enforces; the form uses the same ones. */
export const LIMITS = {
  steps: { min: 1, max: 150 },
  guidance: { min: 0, max: 30 },
  seed: { min: 0, max: 2 ** 32 - 1 },
  promptMaxLength: 2000,
} as const;

/** The JSON body of `POST /generate` and `POST /generate/stream`. Unset fields are left out. */
export interface GenerateParams {
  prompt: string;
  negative_prompt?: string;
  width?: number;
  height?: number;
  num_inference_steps?: number;
  guidance_scale?: number;
  seed?: number;
}

export interface Timings {
  total_s: number;
  compute_s: number | null;
  cold_start_wait_s: number;
}

/** What the proxy returns for one image (JSON mode, and the `image` event of the stream). */
export interface GenerateResult {
  /** Base64 of the image bytes. */
  image: string;
  content_type: string;
  seed: number;
  timings: Timings;
  request_id: string | null;
}

/** Progress reported by the stream before the image arrives. */
export type Progress =
  | { kind: "queued"; position: number | null }
  | { kind: "loading"; etaS: number | null }
  | { kind: "generating" };

/** An error answered by the proxy (or a network failure, with `status` null). */
export class ApiError extends Error {
  readonly code: string;
  readonly status: number | null;
  /** Seconds to wait before trying again, when the proxy said so. */
  readonly retryAfterS: number | null;

  constructor(code: string, message: string, status: number | null, retryAfterS: number | null = null) {
    super(message);
    this.name = "ApiError";
    this.code = code;
    this.status = status;
    this.retryAfterS = retryAfterS;
  }
}

/** The stream endpoint could not be used at all; the caller may fall back to `POST /generate`. */
class StreamUnavailable extends Error {
  constructor(reason: string) {
    super(reason);
    this.name = "StreamUnavailable";
  }
}

export interface GenerateOptions {
  signal?: AbortSignal;
  onProgress?: (progress: Progress) => void;
}

/**
 * Ask the proxy for one image, reporting progress while it waits.
 *
 * Streams from `POST /generate/stream`; if that endpoint is missing or the stream breaks before
 * a result, sends the same request to `POST /generate` (generation has no side effects, so
 * sending it again is safe).
 *
 * @throws ApiError with the proxy's code and message, or code "network" when it is unreachable.
 * @throws DOMException "AbortError" when `signal` aborts.
 */
export async function generateImage(params: GenerateParams, options: GenerateOptions = {}): Promise<GenerateResult> {
  try {
    return await generateStreaming(params, options);
  } catch (error) {
    if (!(error instanceof StreamUnavailable)) throw error;
    console.info(`Streaming unavailable (${error.message}); using POST /generate.`);
    options.onProgress?.({ kind: "generating" });
    return generateOnce(params, options.signal);
  }
}

/** `POST /generate` with `Accept: application/json`: one answer, no progress. */
export async function generateOnce(params: GenerateParams, signal?: AbortSignal): Promise<GenerateResult> {
  let response: Response;
  try {
    response = await send("/generate", params, "application/json", signal);
  } catch (error) {
    if (isAbort(error)) throw error;
    const where = API_URL ? ` at ${API_URL}` : "";
    throw new ApiError("network", `Could not reach the image service${where}. Check that it is running.`, null);
  }
  if (!response.ok) throw await errorFromResponse(response);
  let body: unknown;
  try {
    body = await response.json();
  } catch {
    throw new ApiError("bad_response", "The service answered something that is not JSON.", response.status);
  }
  return checkResult(body);
}

async function generateStreaming(params: GenerateParams, options: GenerateOptions): Promise<GenerateResult> {
  let response: Response;
  try {
    response = await send("/generate/stream", params, "text/event-stream", options.signal);
  } catch (error) {
    if (isAbort(error)) throw error;
    throw new StreamUnavailable("the stream request failed");
  }
  if ([404, 405, 501].includes(response.status)) {
    throw new StreamUnavailable(`the stream endpoint answered ${response.status}`);
  }
  if (!response.ok) throw await errorFromResponse(response);
  const contentType = response.headers.get("content-type") ?? "";
  if (!contentType.includes("text/event-stream") || !response.body) {
    throw new StreamUnavailable(`the stream endpoint answered ${contentType || "no content type"}`);
  }

  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const parser = new SseParser();
  try {
    for (;;) {
      let chunk: ReadableStreamReadResult<Uint8Array>;
      try {
        chunk = await reader.read();
      } catch (error) {
        if (isAbort(error)) throw error;
        throw new StreamUnavailable("the stream broke");
      }
      const text = chunk.done ? decoder.decode() : decoder.decode(chunk.value, { stream: true });
      for (const event of parser.feed(text)) {
        const data = parseJson(event.data);
        switch (event.event) {
          case "queued":
            options.onProgress?.({ kind: "queued", position: numberOrNull(field(data, "position")) });
            break;
          case "loading":
            options.onProgress?.({ kind: "loading", etaS: numberOrNull(field(data, "eta_s")) });
            break;
          case "generating":
            options.onProgress?.({ kind: "generating" });
            break;
          case "image":
            return checkResult(data);
          case "error":
            throw errorFromBody(data, null, null);
          default:
            break; // unknown events are ignored, so the proxy can add some later
        }
      }
      if (chunk.done) {
        parser.end();
        throw new StreamUnavailable("the stream ended without an image");
      }
    }
  } finally {
    reader.cancel().catch(() => undefined);
  }
}

function send(path: string, params: GenerateParams, accept: string, signal?: AbortSignal): Promise<Response> {
  return fetch(`${API_URL}${path}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: accept },
    body: JSON.stringify(params),
    signal,
  });
}

/** `GET /status`: what the proxy knows of the model, without generating anything. */
export interface ModelStatus {
  state: "unknown" | "ready" | "loading" | "unavailable";
  eta_s: number | null;
  message: string | null;
}

export async function fetchStatus(signal?: AbortSignal): Promise<ModelStatus | null> {
  try {
    const response = await fetch(`${API_URL}/status`, { headers: { Accept: "application/json" }, signal });
    if (!response.ok) return null;
    const body: unknown = await response.json();
    const state = field(body, "state");
    if (state !== "unknown" && state !== "ready" && state !== "loading" && state !== "unavailable") return null;
    const message = field(body, "message");
    return { state, eta_s: numberOrNull(field(body, "eta_s")), message: typeof message === "string" ? message : null };
  } catch {
    return null;
  }
}

/** Turn a non-2xx response into an ApiError, keeping the proxy's message as written. */
export async function errorFromResponse(response: Response): Promise<ApiError> {
  const text = await response.text().catch(() => "");
  return errorFromBody(parseJson(text), response.status, response.headers.get("retry-after"), text);
}

function errorFromBody(body: unknown, status: number | null, retryAfterHeader: string | null, text = ""): ApiError {
  const error = field(body, "error");
  let code = status === null ? "error" : `http_${status}`;
  let message: string | null = null;
  let retryAfter = parseRetryAfter(retryAfterHeader);
  if (typeof error === "string") {
    message = error;
  } else if (error && typeof error === "object") {
    const errorCode = field(error, "code");
    const errorMessage = field(error, "message");
    if (typeof errorCode === "string") code = errorCode;
    if (typeof errorMessage === "string") message = errorMessage;
    retryAfter = numberOrNull(field(error, "retry_after")) ?? retryAfter;
  } else if (field(body, "detail") !== undefined) {
    // FastAPI's own shape, in case a route answers before the proxy's error handlers run.
    const detail = field(body, "detail");
    message = typeof detail === "string" ? detail : JSON.stringify(detail);
  }
  if (message === null) {
    const snippet = text.trim().slice(0, 200);
    message = snippet && !snippet.startsWith("<") ? snippet : `The service answered HTTP ${status ?? "error"}.`;
  }
  return new ApiError(code, message, status, retryAfter);
}

function checkResult(body: unknown): GenerateResult {
  const image = field(body, "image");
  const seed = field(body, "seed");
  if (typeof image !== "string" || typeof seed !== "number") {
    throw new ApiError("bad_response", "The service's answer has no image.", null);
  }
  const contentType = field(body, "content_type");
  const timings = field(body, "timings");
  const requestId = field(body, "request_id");
  return {
    image,
    content_type: typeof contentType === "string" ? contentType : "image/png",
    seed,
    timings: {
      total_s: numberOrNull(field(timings, "total_s")) ?? 0,
      compute_s: numberOrNull(field(timings, "compute_s")),
      cold_start_wait_s: numberOrNull(field(timings, "cold_start_wait_s")) ?? 0,
    },
    request_id: typeof requestId === "string" ? requestId : null,
  };
}

/** `Retry-After` is seconds or an HTTP date. */
export function parseRetryAfter(value: string | null): number | null {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, (date - Date.now()) / 1000);
}

export function isAbort(error: unknown): boolean {
  return error instanceof DOMException && error.name === "AbortError";
}

export function base64ToBlob(base64: string, contentType: string): Blob {
  const binary = atob(base64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return new Blob([bytes], { type: contentType });
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

function field(value: unknown, name: string): unknown {
  return value && typeof value === "object" ? (value as Record<string, unknown>)[name] : undefined;
}

function numberOrNull(value: unknown): number | null {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}
