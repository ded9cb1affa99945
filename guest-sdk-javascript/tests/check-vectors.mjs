// The ABI conformance vectors (abi/conformance/vectors.jsonl) against the
// JavaScript SDK in Node.js, without wasm: each step's batch goes through
// `applyBatch` with the conformance probe, and every group's change,
// failure and rendered state must be what the vector says. A fast check
// for SDK work; wagg's test suite runs it, and the same vectors through the
// real runtime (`wagg plugin test --conformance`).
//
// Usage: node check-vectors.mjs <repository root>
import assert from "node:assert/strict";
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";

const root = resolve(process.argv[2] ?? ".");
const changes = ["unchanged", "set", "delete"];
const utf8 = new TextDecoder();

// The probe imports the SDK from beside itself, as in a build: both go
// into a scratch directory (a package of ES modules) to be imported.
const scratch = mkdtempSync(join(tmpdir(), "wagg-sdk-check-"));
writeFileSync(join(scratch, "package.json"), '{"type": "module"}');
copyFileSync(join(root, "guest-sdk-javascript/wagg-sdk.js"), join(scratch, "wagg-sdk.js"));
copyFileSync(join(root, "plugins/testing/conformance/javascript/plugin.js"), join(scratch, "plugin.js"));
const sdk = await import(pathToFileURL(join(scratch, "wagg-sdk.js")));
const { conformance: probe } = await import(pathToFileURL(join(scratch, "plugin.js")));
rmSync(scratch, { recursive: true });

function decodeResult(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let pos = 5;
  const out = [];
  for (let g = view.getUint32(1, true); g > 0; g--) {
    const change = changes[bytes[pos++]];
    let state = null;
    if (change === "set") {
      const length = view.getUint32(pos, true);
      state = bytes.subarray(pos + 4, pos + 4 + length);
      pos += 4 + length;
    }
    let failure = null;
    if (bytes[pos++] === 1) {
      const index = view.getUint32(pos, true);
      const length = view.getUint32(pos + 4, true);
      failure = [index, utf8.decode(bytes.subarray(pos + 8, pos + 8 + length))];
      pos += 8 + length;
    }
    out.push({ change, state, failure });
  }
  assert.equal(pos, bytes.length, "bytes after the last group");
  return out;
}

const cases = readFileSync(join(root, "abi/conformance/vectors.jsonl"), "utf8").trim().split("\n").map(JSON.parse);
for (const testCase of cases) {
  for (const [number, step] of testCase.steps.entries()) {
    if (step.batch_hex === null) break; // carries states: the runtime check covers it
    const results = decodeResult(sdk.applyBatch(probe, {}, Uint8Array.from(Buffer.from(step.batch_hex, "hex"))));
    const where = `${testCase.name} step ${number + 1}`;
    assert.equal(results.length, step.expect.length, `${where}: group count`);
    results.forEach(({ change, state, failure }, i) => {
      const want = step.expect[i];
      assert.equal(change, want.change, `${where}: change`);
      if (want.render) assert.deepEqual(probe.render(JSON.parse(utf8.decode(state))), want.render, `${where}: render`);
      if (want.failure === null) {
        assert.equal(failure, null, `${where}: unexpected failure`);
      } else {
        assert.equal(failure?.[0], want.failure.index, `${where}: failure index`);
        if (want.failure.message) assert.equal(failure[1], want.failure.message, `${where}: message`);
        else assert.ok(failure[1].startsWith(want.failure.message_prefix), `${where}: ${failure[1]}`);
      }
    });
  }
}
console.log(`javascript sdk: ${cases.length} conformance cases ok`);
