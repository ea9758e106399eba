// Protocol v2 (docs/protocol.md §10): the pure part a client keeps across its sockets. The last
// `_pos.offset` seen per `_pos.stream` (opaque: stored and sent back, never parsed or compared),
// the `resume` message every new v2 socket sends first, and the reading of `resumed`.

export const SUBPROTOCOL = 'integrador.v2';
export const PROTOCOL_V2 = 'v2';

/** The `_pos` of an event frame, or null when it has none (or a malformed one). */
export function positionOf(event) {
  const pos = event && typeof event === 'object' ? event._pos : null;
  if (!pos || typeof pos !== 'object' || Array.isArray(pos)) return null;
  if (typeof pos.stream !== 'string' || typeof pos.offset !== 'string') return null;
  return { stream: pos.stream, offset: pos.offset };
}

export class Positions {
  /** @type {Map<string, string>} */ #offsets = new Map();

  /** Remember the event's position, if it has one. @returns {boolean} whether it had one */
  track(event) {
    const pos = positionOf(event);
    if (!pos) return false;
    this.#offsets.set(pos.stream, pos.offset);
    return true;
  }

  /** `{stream: offset}` of every stream seen (a copy). */
  toObject() {
    return Object.fromEntries(this.#offsets);
  }

  get size() {
    return this.#offsets.size;
  }

  /** The first message of every v2 socket: `{"type":"resume","positions":{...}}`. */
  resumeMessage() {
    return JSON.stringify({ type: 'resume', positions: this.toObject() });
  }

  /**
   * Read a `resumed` reply: the streams that were not recovered, whose positions are forgotten
   * (they can never be resumed from again; the next event of the stream brings a new one).
   * @param {unknown} streams the `streams` field
   * @returns {{failed: string[], replayed: number}}
   */
  resumed(streams) {
    if (!streams || typeof streams !== 'object' || Array.isArray(streams)) return { failed: [], replayed: 0 };
    const failed = [];
    let replayed = 0;
    for (const [stream, result] of Object.entries(streams)) {
      const r = result && typeof result === 'object' ? result : {};
      if (Number.isFinite(r.replayed)) replayed += r.replayed;
      if (r.recovered !== true) {
        failed.push(stream);
        this.#offsets.delete(stream);
      }
    }
    return { failed, replayed };
  }

  clear() {
    this.#offsets.clear();
  }
}
