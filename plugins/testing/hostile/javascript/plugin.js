// `hostile` in JavaScript: counts records per key, and misbehaves on every
// record whose value is "bad", as `params.mode` says: `loop` (forever),
// `alloc` (memory without bound), `raise` (an unexpected exception).
import { exportAggregation, paramsObject } from "./wagg-sdk.js";

export const { metadata, configure, apply, render, merges, merge, migratesFrom, migrate } =
  exportAggregation({
    name: "hostile-javascript",
    parseParams: (params) => paramsObject(params, ["mode"]),
    initial: () => 0,
    aggregate(count, record, params) {
      if (record.value === null || new TextDecoder().decode(record.value) !== "bad") return count + 1;
      switch (params.mode) {
        case "loop":
          for (;;) {}
        case "alloc": {
          const hoard = [];
          for (;;) hoard.push(new Uint8Array(1 << 20).fill(1));
        }
        case "raise":
          throw new Error(`hostile plugin raised on offset ${record.offset}`);
        default:
          throw new Error(`unknown mode ${params.mode}`);
      }
    },
    render: (count) => ({ count }),
  });
