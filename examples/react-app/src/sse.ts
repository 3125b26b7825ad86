/**
 * A small parser for `text/event-stream` bodies.
 *
 * `EventSource` only sends GET requests, and `/generate/stream` is a POST, so the page reads the
 * stream with `fetch()` and feeds the decoded text to this parser. It follows the WHATWG
 * "interpreting an event stream" rules: `event:` names the event, `data:` lines are joined with
 * "\n", lines starting with ":" are comments (keep-alives), a blank line dispatches the event.
 */

export interface ServerSentEvent {
  /** The `event:` field, or "message" when the server sent none. */
  event: string;
  /** The `data:` lines joined with "\n". */
  data: string;
}

export class SseParser {
  private buffer = "";
  private eventName = "";
  private dataLines: string[] = [];

  /** Feed the next piece of decoded text; returns the events it completed, in order. */
  feed(chunk: string): ServerSentEvent[] {
    this.buffer += chunk;
    const events: ServerSentEvent[] = [];
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this.buffer);
      if (!match) break;
      // A "\r" at the very end may be the first half of "\r\n": wait for the next chunk.
      if (match[0] === "\r" && match.index === this.buffer.length - 1) break;
      const line = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      const event = this.processLine(line);
      if (event) events.push(event);
    }
    return events;
  }

  /** Call when the stream ends: a final event without its blank line is discarded, as the spec says. */
  end(): void {
    this.buffer = "";
    this.eventName = "";
    this.dataLines = [];
  }

  private processLine(line: string): ServerSentEvent | null {
    if (line === "") {
      const event =
        this.dataLines.length > 0
          ? { event: this.eventName || "message", data: this.dataLines.join("\n") }
          : null;
      this.eventName = "";
      this.dataLines = [];
      return event;
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.eventName = value;
    else if (field === "data") this.dataLines.push(value);
    // `id` and `retry` only matter for EventSource reconnection, which a POST stream does not do.
    return null;
  }
}
