// `count`: the number of records per key (the Rust `count` plugin's twin).
import { exportAggregation } from "./wagg-sdk.js";

export const { metadata, configure, apply, render, merges, merge, migratesFrom, migrate } =
  exportAggregation({
    name: "count",
    initial: () => 0,
    aggregate: (count) => count + 1,
    merge: (a, b) => a + b,
    render: (count) => ({ count }),
  });
