// Runs the dashboard's script once against a live control plane, with a minimal stand-in for
// the browser's DOM, and prints what it rendered as JSON: for `tests/tests/dashboard.rs`.
//
// usage: node harness.mjs BASE_URL TOKEN
const [base, token] = process.argv.slice(2);
const page = await (await fetch(base + "/dashboard")).text();
const script = page.match(/<script>([\s\S]*?)<\/script>/)?.[1];
if (!script) throw new Error("no script in the dashboard page");

const elements = {};
globalThis.document = {
  getElementById: (id) =>
    (elements[id] ??= { hidden: true, innerHTML: "", textContent: "", value: "", addEventListener() {} }),
};
globalThis.location = { hash: "#token=" + encodeURIComponent(token), pathname: "/dashboard" };
globalThis.history = { replaceState() {} };
const stored = {};
globalThis.sessionStorage = {
  getItem: (k) => stored[k] ?? null,
  setItem: (k, v) => { stored[k] = String(v); },
  removeItem: (k) => { delete stored[k]; },
};
globalThis.setInterval = () => {};
const realFetch = globalThis.fetch;
globalThis.fetch = (path, options) => realFetch(base + path, options);

// The script is the page's own; it defines and calls refresh().
(0, eval)(script);
const deadline = Date.now() + 10000;
while (!elements.updated?.textContent && !elements.error?.textContent && Date.now() < deadline) {
  await new Promise((resolve) => setTimeout(resolve, 20));
}
const out = {};
for (const [id, element] of Object.entries(elements)) {
  out[id] = { hidden: element.hidden, html: element.innerHTML, text: element.textContent };
}
console.log(JSON.stringify(out));
