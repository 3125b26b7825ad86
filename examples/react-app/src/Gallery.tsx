import type { Timings } from "./api";

export interface GalleryItem {
  id: string;
  /** An object URL for the image bytes (revoked when the item is removed). */
  url: string;
  fileName: string;
  prompt: string;
  negativePrompt: string;
  seed: number;
  /** The image's own size (null if it could not be decoded). */
  width: number | null;
  height: number | null;
  /** What the form asked for (null: the model's default), for "use again". */
  requestedWidth: number | null;
  requestedHeight: number | null;
  steps: number;
  guidance: number;
  timings: Timings;
  requestId: string | null;
}

function formatSeconds(seconds: number): string {
  return seconds < 10 ? `${seconds.toFixed(1)} s` : `${Math.round(seconds)} s`;
}

function describeTimings(timings: Timings): string {
  const parts = [`${formatSeconds(timings.total_s)} total`];
  if (timings.compute_s !== null) parts.push(`${formatSeconds(timings.compute_s)} compute`);
  if (timings.cold_start_wait_s > 0) parts.push(`${formatSeconds(timings.cold_start_wait_s)} warm-up`);
  return parts.join(" · ");
}

interface Props {
  items: GalleryItem[];
  onReuse: (item: GalleryItem) => void;
  onRemove: (item: GalleryItem) => void;
}

/** Generated images, newest first. */
export function Gallery({ items, onReuse, onRemove }: Props) {
  if (items.length === 0) {
    return (
      <p className="empty" data-testid="gallery-empty">
        Your images will appear here.
      </p>
    );
  }
  return (
    <ul className="gallery" data-testid="gallery">
      {items.map((item) => (
        <li key={item.id} className="card" data-testid="gallery-item">
          <img
            src={item.url}
            alt={item.prompt}
            width={item.width ?? undefined}
            height={item.height ?? undefined}
            data-testid="gallery-image"
          />
          <div className="card-body">
            <p className="card-prompt" title={item.prompt}>
              {item.prompt}
            </p>
            <dl className="card-meta">
              <dt>Seed</dt>
              <dd data-testid="gallery-seed">{item.seed}</dd>
              <dt>Size</dt>
              <dd>
                {item.width !== null ? `${item.width}×${item.height}, ` : ""}
                {item.steps} steps, guidance {item.guidance}
              </dd>
              <dt>Time</dt>
              <dd data-testid="gallery-timings">{describeTimings(item.timings)}</dd>
              <dt>File</dt>
              <dd className="file-name">{item.fileName}</dd>
            </dl>
            <div className="card-actions">
              <a
                href={item.url}
                download={item.fileName}
                data-testid="download-link"
                aria-label={`Download ${item.fileName}`}
              >
                Download
              </a>
              <button type="button" className="link" onClick={() => onReuse(item)}>
                Reuse settings
              </button>
              <button type="button" className="link" onClick={() => onRemove(item)} aria-label={`Remove ${item.fileName}`}>
                Remove
              </button>
            </div>
          </div>
        </li>
      ))}
    </ul>
  );
}
