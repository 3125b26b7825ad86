/** File names for downloaded images: a slug of the prompt and the seed, e.g. `abraza-man-portrait-1234.png`. */

const MAX_SLUG_LENGTH = 48;

/** Lower-case ASCII words of `text` joined by "-", cut at a word boundary; "image" if nothing is left. */
export function slugify(text: string): string {
  const words = text
    .normalize("NFKD")
    .replace(/[\u0300-\u036f]/g, "") // accents: "é" -> "e"
    .toLowerCase()
    .split(/[^a-z0-9]+/)
    .filter(Boolean);
  let slug = "";
  for (const word of words) {
    const next = slug ? `${slug}-${word}` : word;
    if (next.length > MAX_SLUG_LENGTH) break;
    slug = next;
  }
  return slug || (words[0] ?? "image").slice(0, MAX_SLUG_LENGTH);
}

export function extensionFor(contentType: string): string {
  if (contentType.includes("jpeg") || contentType.includes("jpg")) return "jpg";
  if (contentType.includes("webp")) return "webp";
  return "png";
}

export function imageFileName(prompt: string, seed: number, contentType: string): string {
  return `${slugify(prompt)}-${seed}.${extensionFor(contentType)}`;
}
