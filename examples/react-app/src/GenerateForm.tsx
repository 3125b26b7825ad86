import type { FormEvent } from "react";
import { LIMITS } from "./api";

export const SIZES = [256, 384, 512, 640, 768] as const;

/** "Model default" in the size menus: no width or height is sent and the model uses its own
 * resolution (512 px for SD 1.x, 768 px for SD 2.x, 64 px for the demo's tiny model). */
const MODEL_DEFAULT = "";

export interface FormValues {
  prompt: string;
  negativePrompt: string;
  steps: number;
  guidance: number;
  /** Null: the model's own resolution. */
  width: number | null;
  height: number | null;
  /** The seed typed by the user, as text so that an empty box stays empty. */
  seed: string;
  randomSeed: boolean;
}

export const DEFAULT_VALUES: FormValues = {
  prompt: "",
  negativePrompt: "",
  steps: 30,
  guidance: 7.5,
  width: null,
  height: null,
  seed: "",
  randomSeed: true,
};

/** What is wrong with the form, or null when it can be sent. */
export function validate(values: FormValues): string | null {
  if (!values.prompt.trim()) return "Write a prompt first.";
  if (!values.randomSeed) {
    const seed = Number(values.seed);
    if (values.seed.trim() === "" || !Number.isInteger(seed) || seed < LIMITS.seed.min || seed > LIMITS.seed.max) {
      return `The seed must be a whole number from ${LIMITS.seed.min} to ${LIMITS.seed.max}, or tick "Random".`;
    }
  }
  return null;
}

interface Props {
  values: FormValues;
  onChange: (values: FormValues) => void;
  onSubmit: () => void;
  onCancel: () => void;
  running: boolean;
  problem: string | null;
}

function clamp(value: number, min: number, max: number): number {
  return Number.isFinite(value) ? Math.min(max, Math.max(min, value)) : min;
}

export function GenerateForm({ values, onChange, onSubmit, onCancel, running, problem }: Props) {
  const set = <K extends keyof FormValues>(key: K, value: FormValues[K]) => onChange({ ...values, [key]: value });
  const submit = (event: FormEvent) => {
    event.preventDefault();
    if (!running) onSubmit();
  };

  return (
    <form className="panel form" onSubmit={submit} aria-busy={running} noValidate>
      <div className="field">
        <label htmlFor="prompt">Prompt</label>
        <textarea
          id="prompt"
          data-testid="prompt"
          rows={3}
          maxLength={LIMITS.promptMaxLength}
          placeholder="portrait of abraza man as a peaky blinders character"
          value={values.prompt}
          onChange={(e) => set("prompt", e.target.value)}
          onKeyDown={(e) => {
            if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) submit(e);
          }}
          required
          aria-describedby="prompt-hint"
        />
        <small id="prompt-hint" className="hint">
          Ctrl+Enter generates.
        </small>
      </div>

      <div className="field">
        <label htmlFor="negative-prompt">Negative prompt</label>
        <input
          id="negative-prompt"
          data-testid="negative-prompt"
          type="text"
          maxLength={LIMITS.promptMaxLength}
          placeholder="blurry, low quality"
          value={values.negativePrompt}
          onChange={(e) => set("negativePrompt", e.target.value)}
        />
      </div>

      <div className="row">
        <div className="field">
          <label htmlFor="steps">
            Steps <span className="value">{values.steps}</span>
          </label>
          <input
            id="steps"
            data-testid="steps"
            type="range"
            min={LIMITS.steps.min}
            max={LIMITS.steps.max}
            step={1}
            value={values.steps}
            onChange={(e) => set("steps", clamp(Number(e.target.value), LIMITS.steps.min, LIMITS.steps.max))}
          />
        </div>
        <div className="field">
          <label htmlFor="guidance">
            Guidance <span className="value">{values.guidance.toFixed(1)}</span>
          </label>
          <input
            id="guidance"
            data-testid="guidance"
            type="range"
            min={LIMITS.guidance.min}
            max={LIMITS.guidance.max}
            step={0.5}
            value={values.guidance}
            onChange={(e) =>
              set("guidance", clamp(Number(e.target.value), LIMITS.guidance.min, LIMITS.guidance.max))
            }
          />
        </div>
      </div>

      <div className="row">
        <div className="field">
          <label htmlFor="width">Width</label>
          <select
            id="width"
            data-testid="width"
            value={values.width ?? MODEL_DEFAULT}
            onChange={(e) => set("width", e.target.value === MODEL_DEFAULT ? null : Number(e.target.value))}
          >
            <option value={MODEL_DEFAULT}>Model default</option>
            {SIZES.map((size) => (
              <option key={size} value={size}>
                {size} px
              </option>
            ))}
          </select>
        </div>
        <div className="field">
          <label htmlFor="height">Height</label>
          <select
            id="height"
            data-testid="height"
            value={values.height ?? MODEL_DEFAULT}
            onChange={(e) => set("height", e.target.value === MODEL_DEFAULT ? null : Number(e.target.value))}
          >
            <option value={MODEL_DEFAULT}>Model default</option>
            {SIZES.map((size) => (
              <option key={size} value={size}>
                {size} px
              </option>
            ))}
          </select>
        </div>
      </div>

      <div className="field">
        <label htmlFor="seed">Seed</label>
        <div className="seed">
          <input
            id="seed"
            data-testid="seed"
            type="number"
            inputMode="numeric"
            min={LIMITS.seed.min}
            max={LIMITS.seed.max}
            step={1}
            placeholder={values.randomSeed ? "random" : "1234"}
            value={values.randomSeed ? "" : values.seed}
            disabled={values.randomSeed}
            onChange={(e) => set("seed", e.target.value)}
          />
          <label className="checkbox">
            <input
              type="checkbox"
              data-testid="random-seed"
              checked={values.randomSeed}
              onChange={(e) => set("randomSeed", e.target.checked)}
            />
            Random
          </label>
        </div>
      </div>

      {problem && (
        <p className="problem" role="alert" data-testid="form-problem">
          {problem}
        </p>
      )}

      <div className="actions">
        <button type="submit" data-testid="generate" disabled={running}>
          {running ? "Generating…" : "Generate"}
        </button>
        {running && (
          <button type="button" className="secondary" onClick={onCancel}>
            Cancel
          </button>
        )}
      </div>
    </form>
  );
}
