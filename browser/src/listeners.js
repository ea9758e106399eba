// Listener registry: one Set per event type, removed as soon as it is empty.

/** @typedef {(event: any) => void} Callback */

export class Listeners {
  constructor() {
    /** @type {Map<string, Set<Callback>>} */
    this.map = new Map();
  }

  /**
   * @param {string} type an event type or '*'
   * @param {Callback} callback
   * @returns {() => void} unsubscribe
   */
  add(type, callback) {
    let set = this.map.get(type);
    if (!set) {
      set = new Set();
      this.map.set(type, set);
    }
    set.add(callback);
    return () => this.remove(type, callback);
  }

  /** @param {string} type @param {Callback} callback */
  remove(type, callback) {
    const set = this.map.get(type);
    if (!set) return;
    set.delete(callback);
    if (set.size === 0) this.map.delete(type);
  }

  /**
   * Call the type's listeners, then '*'. A listener that throws is reported and does not stop
   * the others.
   * @param {{type?: unknown}} event
   * @param {(error: unknown) => void} [onError]
   */
  dispatch(event, onError) {
    const type = typeof event.type === 'string' ? event.type : '';
    for (const key of type === '*' ? ['*'] : [type, '*']) {
      const set = this.map.get(key);
      if (!set) continue;
      for (const callback of [...set]) {
        try {
          callback(event);
        } catch (error) {
          onError?.(error);
        }
      }
    }
  }

  /** Number of event types with at least one listener. */
  get types() {
    return this.map.size;
  }

  /** Total number of registered callbacks. */
  get size() {
    let n = 0;
    for (const set of this.map.values()) n += set.size;
    return n;
  }

  clear() {
    this.map.clear();
  }
}
