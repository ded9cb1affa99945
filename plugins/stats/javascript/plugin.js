// `stats`: count, min, max, mean and population variance of a numeric field
// per key, with Welford's algorithm (the Rust `stats` plugin's twin).
//
// Params: `field`, a JSON pointer into the record value (e.g. "/amount").
// A record whose field is missing or not a number is rejected.
import { exportAggregation, paramsObject, validatePointer } from "./wagg-sdk.js";

export const { metadata, configure, apply, render, merges, merge, migratesFrom, migrate } =
  exportAggregation({
    name: "stats",
    parseParams(params) {
      const parsed = paramsObject(params, ["field"]);
      validatePointer("field", parsed.field);
      return parsed;
    },
    // [count, min, max, mean, m2]: an array keeps the stored JSON small.
    initial: () => [0, 0, 0, 0, 0],
    aggregate(state, record, params) {
      const x = record.valueNumber(params.field);
      let [count, low, high, mean, m2] = state;
      if (count === 0) {
        low = high = x;
      } else {
        low = Math.min(low, x);
        high = Math.max(high, x);
      }
      count += 1;
      const delta = x - mean;
      mean += delta / count;
      m2 += delta * (x - mean);
      return [count, low, high, mean, m2];
    },
    // Chan et al.'s parallel combination of two sets of moments.
    merge(a, b) {
      if (a[0] === 0) return b;
      if (b[0] === 0) return a;
      const count = a[0] + b[0];
      const delta = b[3] - a[3];
      return [
        count,
        Math.min(a[1], b[1]),
        Math.max(a[2], b[2]),
        a[3] + (delta * b[0]) / count,
        a[4] + b[4] + (delta * delta * a[0] * b[0]) / count,
      ];
    },
    render: ([count, min, max, mean, m2]) => ({
      count,
      min,
      max,
      mean,
      variance: count ? m2 / count : 0,
    }),
  });
