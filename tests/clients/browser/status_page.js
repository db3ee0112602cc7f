// Opens the gateway's status page in Debian's headless Chromium (driven by playwright-core),
// signs in through its login form, waits for the page to refresh itself, takes a screenshot and
// prints what the page shows as one JSON object on stdout.
//
// Usage: node status_page.js '{"url": "http://127.0.0.1:8080", "token": "...",
//          "screenshot": "/path/status.png", "chromium": "/usr/bin/chromium",
//          "refreshes": 2, "breaker": "lp/down", "timeout_ms": 30000}'
// Exit status 0 with the JSON on success; 1 with a message on stderr otherwise.
"use strict";

const fs = require("fs");
const os = require("os");
const path = require("path");
const { chromium } = require("playwright-core");

const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

async function main() {
  const options = JSON.parse(process.argv[2]);
  const timeout = options.timeout_ms || 30000;
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "gw-status-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: options.chromium || "/usr/bin/chromium",
    headless: true,
    args: FLAGS,
    viewport: { width: 1280, height: 800 },
    timeout,
  });
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(timeout);
    const consoleErrors = [];
    page.on("console", (message) => {
      if (message.type() === "error") consoleErrors.push(message.text());
    });
    page.on("pageerror", (error) => consoleErrors.push(String(error)));

    const first = await page.goto(options.url + "/admin/status");
    const loginStatus = first.status();
    await page.fill("#token", options.token);
    await Promise.all([page.waitForURL("**/admin/status"), page.click("button[type=submit]")]);
    await page.waitForFunction((n) => Number(document.body.dataset.refreshed || 0) >= n, options.refreshes || 2);
    if (options.breaker) {
      await page.waitForSelector(`#breakers tr[data-breaker="${options.breaker}"]`);
    }
    const shown = await page.evaluate(() => {
      const cells = (row) => Array.from(row.querySelectorAll("td"), (td) => td.textContent);
      return {
        title: document.title,
        upstreams: Array.from(document.querySelectorAll("#upstreams tbody tr"), (row) => ({ name: row.dataset.upstream, cells: cells(row) })),
        breakers: Array.from(document.querySelectorAll("#breakers tbody tr"), (row) => ({ key: row.dataset.breaker, cells: cells(row) })),
        redis: document.getElementById("redis").textContent,
        replica: document.getElementById("replica").textContent,
        refreshed: Number(document.body.dataset.refreshed),
        error: document.getElementById("error").hidden ? null : document.getElementById("error").textContent,
        documentCookie: document.cookie,
      };
    });
    const cookies = (await context.cookies()).map((c) => ({ name: c.name, httpOnly: c.httpOnly, sameSite: c.sameSite, path: c.path }));
    fs.mkdirSync(path.dirname(options.screenshot), { recursive: true });
    await page.screenshot({ path: options.screenshot, fullPage: true });
    process.stdout.write(JSON.stringify({ loginStatus, shown, cookies, consoleErrors }) + "\n");
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main().catch((error) => {
  process.stderr.write(String(error && error.stack ? error.stack : error) + "\n");
  process.exit(1);
});
