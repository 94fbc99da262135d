// Shared by the Chromium tests: Debian's headless Chromium through playwright-core, and a
// context that lets the page reach 127.0.0.1 only (any other request is recorded, refused).
import { chromium } from "playwright-core";

export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}

// A new context whose every request is pushed to report.requests, and those not for
// 127.0.0.1 also to report.blocked (and aborted).
export async function loopbackOnly(browser, report) {
  const context = await browser.newContext();
  await context.route("**/*", (route) => {
    const target = new URL(route.request().url());
    report.requests.push(route.request().url());
    if (target.hostname !== "127.0.0.1") {
      report.blocked.push(route.request().url());
      return route.abort();
    }
    return route.continue();
  });
  return context;
}
