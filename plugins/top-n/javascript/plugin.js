// `top-n`: the N best items per key by a numeric field (the Rust `top-n`
// plugin's twin).
//
// Params: `n` (1..=1000), `field` (JSON pointer to the score) and `item`
// (optional pointer to what is ranked; without it, whole records are ranked,
// and one item can appear once, with its best score).
import { Reject, exportAggregation, paramsObject, validatePointer } from "./wagg-sdk.js";

const MAX_N = 1000;

// The JSON text that identifies an item (object keys sorted, no spaces).
function canonical(value) {
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  const keys = Object.keys(value).sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(",")}}`;
}

// Best score first; equal scores by item text.
function byRank([scoreA, itemA], [scoreB, itemB]) {
  if (scoreA !== scoreB) return scoreB - scoreA;
  return itemA < itemB ? -1 : itemA > itemB ? 1 : 0;
}

export const { metadata, configure, apply, render, merges, merge, migratesFrom, migrate } =
  exportAggregation({
    name: "top-n",
    parseParams(params) {
      const parsed = paramsObject(params, ["n", "field"], { item: null });
      if (!Number.isInteger(parsed.n) || parsed.n < 1 || parsed.n > MAX_N) {
        throw new Reject(`\`n\` must be between 1 and ${MAX_N}, got ${JSON.stringify(parsed.n)}`);
      }
      validatePointer("field", parsed.field);
      if (parsed.item !== null) validatePointer("item", parsed.item);
      return parsed;
    },
    initial: () => [], // [score, item text] pairs, best first
    aggregate(entries, record, params) {
      const score = record.valueNumber(params.field);
      let item;
      if (params.item !== null) {
        item = canonical(record.valueField(params.item));
        const index = entries.findIndex(([, text]) => text === item);
        if (index >= 0) {
          if (entries[index][0] >= score) return entries;
          entries.splice(index, 1);
        }
      } else {
        item = canonical(record.valueJson());
      }
      entries.push([score, item]);
      entries.sort(byRank);
      entries.length = Math.min(entries.length, params.n);
      return entries;
    },
    merge(a, b, params) {
      const entries = a;
      for (const [score, item] of b) {
        const same = params.item !== null ? entries.find(([, text]) => text === item) : undefined;
        if (same !== undefined) {
          same[0] = Math.max(same[0], score);
        } else {
          entries.push([score, item]);
        }
      }
      entries.sort(byRank);
      return entries.slice(0, params.n);
    },
    render: (entries) => ({
      top: entries.map(([score, item]) => ({ item: JSON.parse(item), score })),
    }),
  });
