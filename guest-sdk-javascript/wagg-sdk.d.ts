// Types for wagg-sdk.js: TypeScript and `// @ts-check` JavaScript editors
// pick them up beside the module.

export declare const ABI_VERSION: 1;

/** Thrown to reject a record (or params) with a message. */
export declare class Reject extends Error {}

/** One Kafka record, as the host hands it to `aggregate`. */
export declare class Record {
  /** The record's key (null: no key). Bytes are views: copy to keep them. */
  readonly key: Uint8Array | null;
  /** The record's value (null: a tombstone). */
  readonly value: Uint8Array | null;
  /** Milliseconds since the Unix epoch, if the record has a timestamp. */
  readonly timestamp: number | null;
  readonly partition: number;
  /** Exact up to 2^53. */
  readonly offset: number;
  /** Headers in record order; a null value is a header without value. */
  readonly headers: ReadonlyArray<readonly [string, Uint8Array | null]>;
  /** The first header called `name` (null when absent or valueless). */
  header(name: string): Uint8Array | null;
  /** The value as text; rejects tombstones and invalid UTF-8. */
  valueStr(): string;
  /** The value parsed as JSON (once per record). */
  valueJson(): unknown;
  /** The JSON value at a pointer ("/order/amount"); rejects when missing. */
  valueField(pointer: string): unknown;
  /** The number at a pointer; rejects a missing field or a non-number. */
  valueNumber(pointer: string): number;
}

/** What a plugin author writes. Only `name` and `aggregate` are required. */
export interface Aggregation<State, Params = { [name: string]: any }> {
  /** Shown by `wagg plugin inspect`. */
  name: string;
  version?: string;
  /** Bump when `encodeState`'s output changes so older states cannot be read. */
  stateFormat?: number;
  /** Older state formats `migrate` reads. */
  migratesFrom?: number[];
  /** The params the other functions get, from the config's `params` table. */
  parseParams?(params: unknown): Params;
  /** Checks params; throw `Reject` naming what is wrong. */
  validate?(params: Params): void;
  /** The state of a key seen for the first time. */
  initial?(params: Params): State;
  /** Folds a record into the state and returns the new state; throwing
   * rejects the record (the key keeps the state from before it). */
  aggregate(state: State, record: Record, params: Params): State;
  /** Whether to keep the key after a batch; false deletes it. */
  keep?(state: State, params: Params): boolean;
  /** The JSON document a query for the key returns (default: the state). */
  render?(state: State, params: Params): unknown;
  /** Define to support session windows: must equal aggregating `a`'s
   * records and then `b`'s. */
  merge?(a: State, b: State, params: Params): State;
  /** A state an older version (format `fromFormat`) wrote. */
  migrate?(fromFormat: number, state: Uint8Array): State;
  /** Stored bytes of a state (default: compact JSON). */
  encodeState?(state: State): Uint8Array;
  decodeState?(bytes: Uint8Array): State;
}

/** The component's exports (the `wit/` world), to re-export by name. */
export interface Exports {
  metadata(): { name: string; version: string; stateFormat: number };
  configure(paramsJson: string): void;
  apply(batch: Uint8Array): Uint8Array;
  render(state: Uint8Array): string;
  merges(): boolean;
  merge(a: Uint8Array, b: Uint8Array): Uint8Array;
  migratesFrom(): Uint32Array;
  migrate(fromFormat: number, state: Uint8Array): Uint8Array;
}

export declare function exportAggregation<State, Params>(
  definition: Aggregation<State, Params>,
): Exports;

/** Applies an encoded batch; returns the encoded result (SDK tests). */
export declare function applyBatch<State, Params>(
  definition: Aggregation<State, Params>,
  params: Params,
  batch: Uint8Array,
): Uint8Array;

/** The value at an RFC 6901 JSON pointer; throws `Reject` when missing. */
export declare function jsonPointer(doc: unknown, pointer: string): unknown;

/** `params` checked to have every `required` name and nothing outside
 * `required` and `optional` (name → default); defaults filled in. */
export declare function paramsObject(
  params: unknown,
  required?: string[],
  optional?: { [name: string]: unknown },
): { [name: string]: any };

/** Rejects a parameter that is not a JSON pointer. */
export declare function validatePointer(param: string, pointer: unknown): void;
