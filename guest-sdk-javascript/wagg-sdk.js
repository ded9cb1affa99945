// wagg guest SDK for JavaScript: write an aggregation plugin as one object.
//
//   import { exportAggregation } from "./wagg-sdk.js";
//   export const { metadata, configure, apply, render, merges, merge, migratesFrom, migrate } =
//     exportAggregation({
//       name: "count",
//       initial: () => 0,
//       aggregate: (count, record) => count + 1,
//     });
//
// `wagg plugin build .` turns `plugin.js` into a WebAssembly component with
// componentize-js. The SDK decodes the host's batches (the flat buffer the
// `wit/` world specifies), keeps each key's state as compact JSON (see
// `encodeState`), parses `params` from the config file, renders state to
// JSON for queries and reports exactly which record failed: anything
// `aggregate` throws rejects that record, with its message, and the host's
// `on_error` policy decides what happens next. Types: wagg-sdk.d.ts.

export const ABI_VERSION = 1;

const FLAG_KEY = 1;
const FLAG_KEY_IS_GROUP_KEY = 2;
const FLAG_VALUE = 4;
const FLAG_TIMESTAMP = 8;
const KNOWN_FLAGS = 15;

const CHANGE_UNCHANGED = 0;
const CHANGE_SET = 1;
const CHANGE_DELETE = 2;

const utf8 = new TextDecoder("utf-8", { fatal: true });
const encoder = new TextEncoder();

/** Thrown to reject a record (or params) with a message. */
export class Reject extends Error {}

class DecodeError extends Error {}

function kind(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  switch (typeof value) {
    case "boolean": return "a boolean";
    case "number": return "a number";
    case "string": return "a string";
    default: return "an object";
  }
}

/** The value at an RFC 6901 JSON pointer ("/order/amount") in `doc`;
 * throws `Reject` naming the pointer when there is none. */
export function jsonPointer(doc, pointer) {
  if (pointer === "") return doc;
  if (!pointer.startsWith("/")) {
    throw new Reject(`\`${pointer}\` is not a JSON pointer (it must start with /)`);
  }
  let node = doc;
  for (const raw of pointer.slice(1).split("/")) {
    const token = raw.replaceAll("~1", "/").replaceAll("~0", "~");
    if (node !== null && typeof node === "object" && Object.hasOwn(node, token)
        && (!Array.isArray(node) || /^(0|[1-9][0-9]*)$/.test(token))) {
      node = node[token];
    } else {
      throw new Reject(`field \`${pointer}\` is missing`);
    }
  }
  return node;
}

/** `params` checked to be an object with every `required` name and no name
 * outside `required` and `optional` (name → default); defaults filled in. */
export function paramsObject(params, required = [], optional = {}) {
  if (params === null || typeof params !== "object" || Array.isArray(params)) {
    throw new Reject(`params must be a table, got ${kind(params)}`);
  }
  for (const name of required) {
    if (!Object.hasOwn(params, name)) throw new Reject(`missing field \`${name}\``);
  }
  for (const name of Object.keys(params)) {
    if (!required.includes(name) && !Object.hasOwn(optional, name)) {
      const allowed = [...required, ...Object.keys(optional)].map((n) => `\`${n}\``).join(", ");
      throw new Reject(`unknown field \`${name}\`, expected one of ${allowed || "none"}`);
    }
  }
  return { ...optional, ...params };
}

/** Rejects a parameter that is not a JSON pointer (empty or "/..."). */
export function validatePointer(param, pointer) {
  if (typeof pointer !== "string" || !(pointer === "" || pointer.startsWith("/"))) {
    throw new Reject(`\`${param}\` must be a JSON pointer such as "/amount", got ${JSON.stringify(pointer)}`);
  }
}

/** One Kafka record. */
export class Record {
  constructor(key, value, timestamp, partition, offset, headers) {
    this.key = key;
    this.value = value;
    this.timestamp = timestamp;
    this.partition = partition;
    this.offset = offset;
    this.headers = headers;
    this.parsed = undefined;
  }

  header(name) {
    const found = this.headers.find(([headerName]) => headerName === name);
    return found === undefined ? null : found[1];
  }

  valueStr() {
    if (this.value === null) throw new Reject("record has no value (tombstone)");
    try {
      return utf8.decode(this.value);
    } catch (e) {
      throw new Reject(`value is not UTF-8: ${e.message}`);
    }
  }

  valueJson() {
    if (this.parsed === undefined) {
      const text = this.valueStr();
      try {
        this.parsed = JSON.parse(text);
      } catch (e) {
        throw new Reject(`value is not valid JSON: ${e.message}`);
      }
    }
    return this.parsed;
  }

  valueField(pointer) {
    return jsonPointer(this.valueJson(), pointer);
  }

  valueNumber(pointer) {
    const found = this.valueField(pointer);
    if (typeof found !== "number") {
      throw new Reject(`field \`${pointer}\` is ${kind(found)}, not a number`);
    }
    return found;
  }
}

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }
  need(n) {
    if (this.pos + n > this.bytes.length) {
      throw new DecodeError(`truncated at byte ${this.pos}: ${n} more bytes expected`);
    }
  }
  u8() { this.need(1); return this.bytes[this.pos++]; }
  u32() { this.need(4); const v = this.view.getUint32(this.pos, true); this.pos += 4; return v; }
  i32() { this.need(4); const v = this.view.getInt32(this.pos, true); this.pos += 4; return v; }
  // i64 as a Number: exact within ±2^53 (offsets and millisecond
  // timestamps); two 32-bit reads, as a BigInt per field is slow here.
  i64() {
    this.need(8);
    const low = this.view.getUint32(this.pos, true);
    const high = this.view.getInt32(this.pos + 4, true);
    this.pos += 8;
    return high * 4294967296 + low;
  }
  take(n) { this.need(n); const chunk = this.bytes.subarray(this.pos, this.pos + n); this.pos += n; return chunk; }
  bytesField() { return this.take(this.u32()); }
  flag(what) {
    const v = this.u8();
    if (v > 1) throw new DecodeError(`${what} flag is ${v}, expected 0 or 1`);
    return v === 1;
  }
}

function readRecord(reader, groupKey) {
  const flags = reader.u8();
  if (flags & ~KNOWN_FLAGS) throw new DecodeError(`unknown record flags 0x${flags.toString(16)}`);
  let key = null;
  if (flags & FLAG_KEY) key = flags & FLAG_KEY_IS_GROUP_KEY ? groupKey : reader.bytesField();
  const value = flags & FLAG_VALUE ? reader.bytesField() : null;
  const timestamp = flags & FLAG_TIMESTAMP ? reader.i64() : null;
  const partition = reader.i32();
  const offset = reader.i64();
  const headers = [];
  for (let count = reader.u32(); count > 0; count--) {
    let name;
    try {
      name = utf8.decode(reader.bytesField());
    } catch {
      throw new DecodeError("header name is not UTF-8");
    }
    headers.push([name, reader.flag("header value") ? reader.bytesField() : null]);
  }
  return new Record(key, value, timestamp, partition, offset, headers);
}

function readGroup(reader) {
  const key = reader.bytesField();
  const state = reader.flag("state") ? reader.bytesField() : null;
  const count = reader.u32();
  if (count === 0) throw new DecodeError("a group has no records");
  const records = [];
  for (let i = 0; i < count; i++) records.push(readRecord(reader, key));
  return { key, state, records };
}

function describe(error) {
  if (error instanceof Reject) return error.message;
  if (error instanceof Error) return `${error.name}: ${error.message}`;
  return String(error);
}

class Writer {
  constructor() {
    this.bytes = new Uint8Array(4096);
    this.view = new DataView(this.bytes.buffer);
    this.length = 0;
  }
  reserve(n) {
    if (this.length + n <= this.bytes.length) return;
    const grown = new Uint8Array(Math.max(this.bytes.length * 2, this.length + n));
    grown.set(this.bytes.subarray(0, this.length));
    this.bytes = grown;
    this.view = new DataView(grown.buffer);
  }
  u8(v) { this.reserve(1); this.bytes[this.length++] = v; }
  u32(v) { this.reserve(4); this.view.setUint32(this.length, v, true); this.length += 4; }
  bytesField(b) { this.u32(b.length); this.reserve(b.length); this.bytes.set(b, this.length); this.length += b.length; }
  finish() { return this.bytes.subarray(0, this.length); }
}

/** The full definition with defaults filled in. */
function withDefaults(definition) {
  return {
    version: "0.1.0",
    stateFormat: 1,
    migratesFrom: [],
    parseParams: (params) => params,
    validate: () => {},
    initial: () => null,
    keep: () => true,
    render: (state) => state,
    // Compact JSON: self-describing, so a later version that adds a field
    // reads older states (give the field a default) without a new
    // stateFormat. Not for NaN/Infinity (JSON has none) or BigInt.
    encodeState: (state) => encoder.encode(JSON.stringify(state)),
    decodeState: (bytes) => JSON.parse(utf8.decode(bytes)),
    migrate: (fromFormat) => {
      throw new Reject(`\`${definition.name}\` does not migrate state format ${fromFormat}`);
    },
    ...definition,
  };
}

function applyGroup(agg, params, stored, records) {
  const fresh = () => (stored === null ? agg.initial(params) : agg.decodeState(stored));
  let state;
  try {
    state = fresh();
  } catch (e) {
    return [CHANGE_UNCHANGED, null, [0, `stored state could not be decoded as state format ${agg.stateFormat} of \`${agg.name}\`: ${describe(e)}`]];
  }
  let applied = 0;
  let failure = null;
  for (const record of records) {
    try {
      state = agg.aggregate(state, record, params);
    } catch (e) {
      failure = [applied, describe(e)];
      break;
    }
    applied++;
  }
  if (failure !== null && applied > 0) {
    // `aggregate` may have changed the state in place before it threw:
    // rebuild it from exactly the records before the failing one.
    try {
      state = fresh();
      for (const record of records.slice(0, applied)) state = agg.aggregate(state, record, params);
    } catch (e) {
      return [CHANGE_UNCHANGED, null, [0, `aggregate is not deterministic: ${describe(e)}`]];
    }
  }
  if (applied === 0) return [CHANGE_UNCHANGED, null, failure];
  try {
    if (!agg.keep(state, params)) return [CHANGE_DELETE, null, failure];
    return [CHANGE_SET, agg.encodeState(state), failure];
  } catch (e) {
    return [CHANGE_UNCHANGED, null, [0, `state could not be encoded: ${describe(e)}`]];
  }
}

/** Applies an encoded batch (Uint8Array) with an aggregation definition
 * and parsed params; returns the encoded result. */
export function applyBatch(definition, params, batch) {
  return applyWith(withDefaults(definition), params, batch);
}

function applyWith(agg, params, batch) {
  const reader = new Reader(batch);
  const version = reader.u8();
  if (version !== ABI_VERSION) throw new DecodeError(`abi version ${version}, this SDK speaks ${ABI_VERSION}`);
  const groups = reader.u32();
  const out = new Writer();
  out.u8(ABI_VERSION);
  out.u32(groups);
  for (let g = 0; g < groups; g++) {
    const { state: stored, records } = readGroup(reader);
    const [change, state, failure] = applyGroup(agg, params, stored, records);
    out.u8(change);
    if (change === CHANGE_SET) out.bytesField(state);
    if (failure === null) {
      out.u8(0);
    } else {
      out.u8(1);
      out.u32(failure[0]);
      out.bytesField(encoder.encode(failure[1]));
    }
  }
  if (reader.pos !== batch.length) throw new DecodeError(`${batch.length - reader.pos} bytes after the last group`);
  return out.finish();
}

/** The component's exports for an aggregation: destructure them into
 * `export const { metadata, configure, apply, render, merges, merge,
 * migratesFrom, migrate } = exportAggregation({...})`. */
export function exportAggregation(definition) {
  const agg = withDefaults(definition);
  let params;
  let configured = false;
  const current = () => {
    if (!configured) throw "called before configure";
    return params;
  };
  const fail = (what, e) => {
    throw `${what}: ${describe(e)}`;
  };
  return {
    metadata: () => ({ name: agg.name, version: agg.version, stateFormat: agg.stateFormat }),
    configure(paramsJson) {
      try {
        const parsed = agg.parseParams(JSON.parse(paramsJson));
        agg.validate(parsed);
        params = parsed;
        configured = true;
      } catch (e) {
        fail(`invalid params for \`${agg.name}\``, e);
      }
    },
    apply(batch) {
      const p = current();
      try {
        return applyWith(agg, p, batch);
      } catch (e) {
        if (e instanceof DecodeError) fail("batch could not be decoded", e);
        throw e;
      }
    },
    render(state) {
      const p = current();
      try {
        return JSON.stringify(agg.render(agg.decodeState(state), p));
      } catch (e) {
        fail("render failed", e);
      }
    },
    merges: () => typeof agg.merge === "function",
    merge(a, b) {
      const p = current();
      if (typeof agg.merge !== "function") throw `\`${agg.name}\` does not merge states`;
      try {
        return agg.encodeState(agg.merge(agg.decodeState(a), agg.decodeState(b), p));
      } catch (e) {
        fail("merge failed", e);
      }
    },
    migratesFrom: () => new Uint32Array(agg.migratesFrom),
    migrate(fromFormat, state) {
      if (!agg.migratesFrom.includes(fromFormat)) {
        throw `\`${agg.name}\` (state format ${agg.stateFormat}) does not migrate from state format ${fromFormat}`;
      }
      try {
        return agg.encodeState(agg.migrate(fromFormat, state));
      } catch (e) {
        fail("migrate failed", e);
      }
    },
  };
}
