// Builds one JavaScript plugin module into a component (`wagg plugin build`
// writes it into the componentize-js install, named by its digest, and runs
// it from there so that the package import resolves).
// Usage: node componentize-js.mjs <plugin.js> <wit dir> <world> <out.wasm>
import { componentize } from "@bytecodealliance/componentize-js";
import { writeFile } from "node:fs/promises";

const [sourcePath, witPath, worldName, out] = process.argv.slice(2);
const { component } = await componentize({
  sourcePath,
  witPath,
  worldName,
  // Plugins cannot make HTTP requests; keep console output, Math.random and
  // Date, which the host provides (and whose use it documents).
  disableFeatures: ["http", "fetch-event"],
});
await writeFile(out, component);
