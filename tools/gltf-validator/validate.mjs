// Khronos glTF-Validator on one file: `node tools/gltf-validator/validate.mjs scene.glb` prints its report JSON.
// Exit status 0 when the report has no errors, 1 when it has some, 2 when the file cannot be read or parsed.
import { readFileSync } from "node:fs";
import { basename } from "node:path";
import { validateBytes } from "gltf-validator";

const [path] = process.argv.slice(2);
if (!path) {
    console.error("usage: node validate.mjs FILE.glb");
    process.exit(2);
}
try {
    const report = await validateBytes(new Uint8Array(readFileSync(path)), { uri: basename(path), maxIssues: 100 });
    console.log(JSON.stringify(report, null, 2));
    process.exit(report.issues.numErrors > 0 ? 1 : 0);
} catch (error) {
    console.error(`${path}: ${error}`);
    process.exit(2);
}
