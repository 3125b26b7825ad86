import { useCallback, useEffect, useRef, useState } from "react";
import {
  ApiError,
  base64ToBlob,
  fetchStatus,
  generateImage,
  isAbort,
  type GenerateParams,
  type ModelStatus,
  type Progress,
} from "./api";
import { imageFileName } from "./filename";
import { Gallery, type GalleryItem } from "./Gallery";
import { DEFAULT_VALUES, GenerateForm, validate, type FormValues } from "./GenerateForm";
import { ErrorArea, ModelBadge, StatusArea, type Phase, type ShownError } from "./Panels";

function toParams(values: FormValues): GenerateParams {
  const params: GenerateParams = {
    prompt: values.prompt.trim(),
    num_inference_steps: values.steps,
    guidance_scale: values.guidance,
  };
  // Without a size the model draws at its own resolution.
  if (values.width !== null) params.width = values.width;
  if (values.height !== null) params.height = values.height;
  const negative = values.negativePrompt.trim();
  if (negative) params.negative_prompt = negative;
  // With no seed the proxy draws one and returns it, so every image still records its seed.
  if (!values.randomSeed) params.seed = Number(values.seed);
  return params;
}

/** The pixel size of an image, or null when the browser cannot decode it. */
async function imageSize(blob: Blob): Promise<{ width: number; height: number } | null> {
  try {
    const bitmap = await createImageBitmap(blob);
    const size = { width: bitmap.width, height: bitmap.height };
    bitmap.close();
    return size;
  } catch {
    return null;
  }
}

function nextPhase(previous: Phase, progress: Progress): Phase {
  const startedAt = previous.kind === "idle" ? Date.now() : previous.startedAt;
  switch (progress.kind) {
    case "queued":
      return { kind: "queued", startedAt, position: progress.position };
    case "loading":
      return {
        kind: "loading",
        startedAt,
        etaS: progress.etaS,
        deadline: progress.etaS !== null ? Date.now() + progress.etaS * 1000 : null,
      };
    case "generating":
      return { kind: "generating", startedAt };
  }
}

export function App() {
  const [values, setValues] = useState<FormValues>(DEFAULT_VALUES);
  const [phase, setPhase] = useState<Phase>({ kind: "idle" });
  const [error, setError] = useState<ShownError | null>(null);
  const [problem, setProblem] = useState<string | null>(null);
  const [items, setItems] = useState<GalleryItem[]>([]);
  const [modelStatus, setModelStatus] = useState<ModelStatus | null>(null);
  const abortRef = useRef<AbortController | null>(null);
  const nextId = useRef(0);
  const itemsRef = useRef<GalleryItem[]>(items);
  itemsRef.current = items;
  const running = phase.kind !== "idle";

  const refreshStatus = useCallback(() => {
    fetchStatus().then(setModelStatus, () => setModelStatus(null));
  }, []);

  useEffect(() => {
    refreshStatus();
  }, [refreshStatus]);

  // Revoke every object URL when the page goes away.
  useEffect(() => () => itemsRef.current.forEach((item) => URL.revokeObjectURL(item.url)), []);

  const generate = async () => {
    const invalid = validate(values);
    setProblem(invalid);
    if (invalid) return;
    setError(null);
    const params = toParams(values);
    const controller = new AbortController();
    abortRef.current = controller;
    setPhase({ kind: "sending", startedAt: Date.now() });
    try {
      const result = await generateImage(params, {
        signal: controller.signal,
        onProgress: (progress) => setPhase((previous) => nextPhase(previous, progress)),
      });
      const blob = base64ToBlob(result.image, result.content_type);
      const size = await imageSize(blob);
      const item: GalleryItem = {
        id: `${Date.now()}-${nextId.current++}`,
        url: URL.createObjectURL(blob),
        fileName: imageFileName(params.prompt, result.seed, result.content_type),
        prompt: params.prompt,
        negativePrompt: params.negative_prompt ?? "",
        seed: result.seed,
        width: size?.width ?? params.width ?? null,
        height: size?.height ?? params.height ?? null,
        requestedWidth: values.width,
        requestedHeight: values.height,
        steps: values.steps,
        guidance: values.guidance,
        timings: result.timings,
        requestId: result.request_id,
      };
      setItems((previous) => [item, ...previous]);
    } catch (caught) {
      if (isAbort(caught)) return;
      if (caught instanceof ApiError) {
        setError({
          code: caught.code,
          message: caught.message,
          retryAt: caught.retryAfterS !== null ? Date.now() + caught.retryAfterS * 1000 : null,
        });
      } else {
        setError({ code: "error", message: String(caught), retryAt: null });
      }
    } finally {
      if (abortRef.current === controller) abortRef.current = null;
      setPhase({ kind: "idle" });
      refreshStatus();
    }
  };

  const cancel = () => abortRef.current?.abort();

  const reuse = (item: GalleryItem) => {
    setValues({
      prompt: item.prompt,
      negativePrompt: item.negativePrompt,
      steps: item.steps,
      guidance: item.guidance,
      width: item.requestedWidth,
      height: item.requestedHeight,
      seed: String(item.seed),
      randomSeed: false,
    });
    window.scrollTo({ top: 0, behavior: "smooth" });
  };

  const remove = (item: GalleryItem) => {
    URL.revokeObjectURL(item.url);
    setItems((previous) => previous.filter((other) => other.id !== item.id));
  };

  return (
    <div className="page">
      <header className="header">
        <h1>Stable Diffusion studio</h1>
        <ModelBadge status={modelStatus} />
      </header>
      <main className="layout">
        <section aria-labelledby="settings-heading">
          <h2 id="settings-heading" className="visually-hidden">
            Settings
          </h2>
          <GenerateForm
            values={values}
            onChange={setValues}
            onSubmit={generate}
            onCancel={cancel}
            running={running}
            problem={problem}
          />
          <StatusArea phase={phase} />
          <ErrorArea error={error} onDismiss={() => setError(null)} />
        </section>
        <section aria-labelledby="gallery-heading" aria-busy={running}>
          <h2 id="gallery-heading">Gallery</h2>
          <Gallery items={items} onReuse={reuse} onRemove={remove} />
        </section>
      </main>
    </div>
  );
}
