// Drives dist/wasm32/demo.html in Debian's headless Chromium (playwright-core) for
// tests/test_target_wasm32.py. Usage: node tests/test_target_wasm32_browser.mjs URL
// Loads the page, waits for runs of the gateway's sensor workflow with the anomaly plugin's
// score, reloads, and checks the earlier runs are listed again (kept in IndexedDB).
// Prints one JSON line: what the page showed before and after the reload, and every URL asked.
import { launch, loopbackOnly } from "./browser.mjs";

const [url] = process.argv.slice(2);
const report = { requests: [], blocked: [], console: [] };
const browser = await launch();

// What the page lists: [{id, status, z}] from its runs table, and what frys.runs() says.
async function shown(page) {
  const rows = await page.locator("#runs tr").evaluateAll((trs) =>
    trs.map((tr) => ({
      id: tr.dataset.run,
      status: tr.children[2].textContent,
      z: tr.children[4].textContent,
    })));
  const stored = await page.evaluate(() => window.frys.runs({ limit: 100000 }).map((r) => r.id));
  return { rows, stored, count: Number(await page.textContent("#count")) };
}

try {
  // Everything must come from the bundle's server: any other host is recorded and refused.
  const context = await loopbackOnly(browser, report);
  const page = await context.newPage();
  page.on("console", (m) => report.console.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => report.console.push(`pageerror: ${e.message}`));

  let started = Date.now();
  await page.goto(url);
  await page.locator("body[data-ready=true]").waitFor({ timeout: 60000 });
  report.firstReadyMs = Date.now() - started;
  // The interval trigger runs the workflow every second; also run it once by the button.
  await page.click("#run");
  await page.waitForFunction(
    () => document.querySelectorAll("#runs tr").length >= 3
      && [...document.querySelectorAll("#runs tr td:nth-child(5)")].some((td) => td.textContent),
    null, { timeout: 30000 });
  // Every run listed now was committed; sync() resolves once those commits are in IndexedDB
  // (the copy each commit schedules). The page is reloaded while the runtime still runs.
  report.before = await shown(page);
  await page.evaluate(() => window.frys.sync());

  started = Date.now();
  await page.reload();
  await page.locator("body[data-ready=true]").waitFor({ timeout: 60000 });
  report.secondReadyMs = Date.now() - started;
  report.after = await shown(page);
  report.latest = await page.textContent("#latest");
} finally {
  await browser.close();
}
process.stdout.write(`${JSON.stringify(report)}\n`);
