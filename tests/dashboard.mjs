// Drives the dashboard (GET /) in Debian's headless Chromium with playwright-core.
// Usage: node tests/dashboard.mjs URL TOKEN RUN_ID
// Prints one JSON line: what the page showed, and every URL it asked for.
import { launch, loopbackOnly } from "./browser.mjs";

const [url, token, runId] = process.argv.slice(2);
const origin = new URL(url);
const report = { requests: [], websockets: [], blocked: [], console: [] };
const browser = await launch();
try {
  const context = await loopbackOnly(browser, report);
  const page = await context.newPage();
  page.on("websocket", (ws) => report.websockets.push(ws.url()));
  page.on("console", (m) => report.console.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => report.console.push(`pageerror: ${e.message}`));

  const started = Date.now();
  await page.goto(url);
  // With a token configured the page asks for it before showing anything.
  await page.locator("#login").waitFor({ state: "visible", timeout: 10000 });
  await page.fill("#token", token);
  await page.click("#login-form button");
  const run = page.locator(`[data-run="${runId}"][data-status="succeeded"]`);
  await run.waitFor({ timeout: 10000 });
  report.loadMs = Date.now() - started;
  report.runSteps = await run.locator("[data-step]").evaluateAll(
    (steps) => steps.map((s) => s.getAttribute("data-step")));
  report.runBars = await run.locator(".bar").count();
  report.overall = await page.textContent("#overall");
  report.plugins = await page.locator("[data-plugin]").evaluateAll(
    (rows) => rows.map((r) => r.getAttribute("data-plugin")));

  // A live event, published after the page is following the log.
  await page.locator("#live", { hasText: "events: live" }).waitFor({ timeout: 10000 });
  const marker = `hello-${Date.now()}`;
  const posted = await fetch(new URL("/events", origin), {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: JSON.stringify({ topic: "dashboard/test", payload: { marker }, durable: true }),
  });
  report.publishStatus = posted.status;
  const live = page.locator("#events li", { hasText: marker });
  await live.waitFor({ timeout: 10000 });
  report.liveEvent = await live.textContent();

  // The start button: a run of greet with inputs, shown like the one started through the API.
  await page.selectOption("#workflow", "greet");
  await page.fill("#inputs", '{"reading": 7}');
  await page.click("#start-button");
  await page.locator("#start-result", { hasText: "started run" }).waitFor({ timeout: 10000 });
  const startedId = (await page.textContent("#start-result")).split(" ").pop();
  await page.locator(`[data-run="${startedId}"]`).waitFor({ timeout: 10000 });
  report.startedRun = startedId;
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
