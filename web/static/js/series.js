// One metric's points in memory: history from the server plus live appends, kept under a cap.
//
// The server downsamples history into buckets keeping min, max and the last value; live points
// arrive one step at a time. To stay smooth for runs of millions of steps the buffer never grows
// past `cap`: when it does, adjacent pairs are merged the same way the server buckets them (last
// value, min of mins, max of maxes), so spikes survive thinning.

export const DEFAULT_CAP = 4000;

/** A finite number, or null for anything else (NaN, ±Infinity, null, strings such as "NaN"). */
export function toNumber(v) {
  return typeof v === "number" && Number.isFinite(v) ? v : null;
}

/** Index of the first element of the sorted array `a` that is > x (a.length when none). */
export function upperBound(a, x) {
  let lo = 0;
  let hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (a[mid] <= x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Index of the first element of the sorted array `a` that is >= x (a.length when none). */
export function lowerBound(a, x) {
  let lo = 0;
  let hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (a[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function minOf(a, b) {
  if (a === null) return b;
  if (b === null) return a;
  return a < b ? a : b;
}

function maxOf(a, b) {
  if (a === null) return b;
  if (b === null) return a;
  return a > b ? a : b;
}

export class Series {
  constructor(cap = DEFAULT_CAP) {
    if (!(cap >= 4)) throw new RangeError(`series cap must be at least 4, got ${cap}`);
    this.cap = cap;
    this.clear();
  }

  clear() {
    this.step = [];
    this.value = [];
    this.min = [];
    this.max = [];
  }

  get length() {
    return this.step.length;
  }

  get lastStep() {
    return this.step.length ? this.step[this.step.length - 1] : null;
  }

  get lastValue() {
    return this.value.length ? this.value[this.value.length - 1] : null;
  }

  /** Replace the contents with server history, keeping live points newer than that history. */
  loadHistory(history) {
    const steps = Array.isArray(history?.step) ? history.step : [];
    const values = Array.isArray(history?.value) ? history.value : [];
    const n = Math.min(steps.length, values.length);
    const last = n ? steps[n - 1] : -Infinity;
    const keep = upperBound(this.step, last);
    const tail = {
      step: this.step.slice(keep),
      value: this.value.slice(keep),
      min: this.min.slice(keep),
      max: this.max.slice(keep),
    };
    const mins = Array.isArray(history?.min) && history.min.length >= n ? history.min : values;
    const maxs = Array.isArray(history?.max) && history.max.length >= n ? history.max : values;
    this.step = steps.slice(0, n);
    this.value = values.slice(0, n).map(toNumber);
    this.min = mins.slice(0, n).map(toNumber);
    this.max = maxs.slice(0, n).map(toNumber);
    this.step.push(...tail.step);
    this.value.push(...tail.value);
    this.min.push(...tail.min);
    this.max.push(...tail.max);
    this.thin();
  }

  /**
   * Add one live point. A step at or before the last one means the run went back (a resume
   * from an older checkpoint): the newer points are dropped so the line follows the new timeline.
   */
  append(step, value) {
    if (typeof step !== "number" || !Number.isFinite(step)) return;
    const v = toNumber(value);
    const last = this.lastStep;
    if (last !== null && step <= last) {
      const cut = lowerBound(this.step, step);
      this.step.length = cut;
      this.value.length = cut;
      this.min.length = cut;
      this.max.length = cut;
    }
    this.step.push(step);
    this.value.push(v);
    this.min.push(v);
    this.max.push(v);
    if (this.step.length > this.cap) this.thin();
  }

  /** Halve by merging adjacent pairs; each halving leaves room for cap/2 cheap appends. */
  thin() {
    while (this.step.length > this.cap) this.mergePairs();
  }

  mergePairs() {
    const n = this.step.length;
    const half = n >>> 1;
    // An odd point out stays at the end unmerged, so the newest point is always exact.
    const odd = n % 2;
    const step = new Array(half + odd);
    const value = new Array(half + odd);
    const min = new Array(half + odd);
    const max = new Array(half + odd);
    for (let i = 0; i < half; i += 1) {
      const a = 2 * i;
      const b = a + 1;
      step[i] = this.step[b];
      value[i] = this.value[b];
      min[i] = minOf(this.min[a], this.min[b]);
      max[i] = maxOf(this.max[a], this.max[b]);
    }
    if (odd) {
      step[half] = this.step[n - 1];
      value[half] = this.value[n - 1];
      min[half] = this.min[n - 1];
      max[half] = this.max[n - 1];
    }
    this.step = step;
    this.value = value;
    this.min = min;
    this.max = max;
  }
}

/**
 * Exponential moving average with TensorBoard's debiasing (the first points are not pulled
 * towards zero). Null values stay null and do not enter the average.
 */
export function ema(values, weight) {
  const out = new Array(values.length);
  if (!(weight > 0)) {
    for (let i = 0; i < values.length; i += 1) out[i] = values[i];
    return out;
  }
  const w = Math.min(weight, 0.999);
  let acc = 0;
  let wn = 1;
  for (let i = 0; i < values.length; i += 1) {
    const v = values[i];
    if (v === null || v === undefined) {
      out[i] = null;
      continue;
    }
    acc = acc * w + (1 - w) * v;
    wn *= w;
    out[i] = acc / (1 - wn);
  }
  return out;
}

/** Values a log scale can draw: non-positive ones become gaps. */
export function positiveOnly(values) {
  const out = new Array(values.length);
  for (let i = 0; i < values.length; i += 1) {
    const v = values[i];
    out[i] = v !== null && v > 0 ? v : null;
  }
  return out;
}
