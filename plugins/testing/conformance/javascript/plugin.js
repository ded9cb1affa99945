// `conformance`: the ABI conformance probe (see the Rust crate beside this
// directory for what each line holds).
import { Reject, exportAggregation } from "./wagg-sdk.js";

const hex = (bytes) =>
  bytes === null ? "-" : Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

const text = (bytes) => (bytes === null ? null : new TextDecoder().decode(bytes));

function describe(record) {
  const headers = record.headers.map(([name, value]) => `${name}=${hex(value)}`).join(",");
  const timestamp = record.timestamp === null ? "-" : String(record.timestamp);
  return `p${record.partition}@${record.offset} k=${hex(record.key)} v=${hex(record.value)} t=${timestamp} h=[${headers}]`;
}

// Exported too, for the SDK's native check (guest-sdk-javascript/tests).
export const conformance = {
    name: "conformance",
    initial: () => [],
    aggregate(lines, record) {
      const value = text(record.value);
      if (value === "reject") {
        lines.push("rejected record"); // changed before failing: the SDK must undo it
        throw new Reject(`rejected p${record.partition}@${record.offset}`);
      }
      if (value === "delete") return [];
      lines.push(describe(record));
      return lines;
    },
    keep: (lines) => lines.length > 0,
    render: (lines) => ({ records: lines }),
};

export const { metadata, configure, apply, render, merges, merge, migratesFrom, migrate } =
  exportAggregation(conformance);
