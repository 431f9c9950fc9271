/**
 * Every timer the client starts goes through one of these, so `close()` can prove it left
 * nothing behind: clearing the set stops them all.
 */
export class TimerSet {
  private readonly handles = new Set<ReturnType<typeof setTimeout>>();

  after(ms: number, fn: () => void): () => void {
    const handle = setTimeout(() => {
      this.handles.delete(handle);
      fn();
    }, ms);
    this.handles.add(handle);
    return () => {
      if (this.handles.delete(handle)) clearTimeout(handle);
    };
  }

  clear(): void {
    for (const handle of this.handles) clearTimeout(handle);
    this.handles.clear();
  }

  get size(): number {
    return this.handles.size;
  }
}
