// Drives the dashboard in headless Chromium (run by tests/it/dashboard.rs, which starts the
// daemon and passes BASE, ADMIN_TOKEN, AGENT_TOKEN, HANDLE and SCREENSHOT in the environment).
// Exits non-zero with a message on the first expectation that fails.
import { chromium } from "playwright-core";

const { BASE, ADMIN_TOKEN, AGENT_TOKEN, HANDLE, SCREENSHOT } = process.env;
const fail = (message) => { console.error("dashboard test: " + message); process.exit(1); };

async function pay(amount) {
  const hold = await fetch(`${BASE}/v1/holds`, {
    method: "POST",
    headers: { Authorization: `Bearer ${AGENT_TOKEN}`, "Content-Type": "application/json" },
    body: JSON.stringify({ amount_micros: amount, service: "api.openai.com", task: "browser-1" }),
  });
  const body = await hold.json();
  if (hold.status !== 201) return { status: hold.status, body };
  const settle = await fetch(`${BASE}/v1/holds/${body.hold_id}/settle`, {
    method: "POST",
    headers: { Authorization: `Bearer ${AGENT_TOKEN}`, "Content-Type": "application/json" },
    body: JSON.stringify({ amount_micros: amount }),
  });
  return { status: settle.status, body: await settle.json() };
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on("pageerror", (e) => fail("page error: " + e.message));
  await page.goto(`${BASE}/dashboard`);
  await page.fill("#token", ADMIN_TOKEN);
  await page.click("#login-form button[type=submit]");
  const row = page.locator(`.agent[data-handle="${HANDLE}"]`);
  await row.waitFor({ timeout: 10000 });
  const before = Number(await row.getAttribute("data-spent"));
  const widthBefore = await row.locator(".bar .spent").evaluate((e) => e.getBoundingClientRect().width);
  await page.waitForFunction(() => document.getElementById("live-text").textContent === "live", null, { timeout: 10000 });

  // A payment moves the agent's bar (through the live event stream; no reload).
  const paid = await pay(1_500_000);
  if (paid.status !== 200) fail(`payment failed: ${paid.status} ${JSON.stringify(paid.body)}`);
  await page.waitForFunction(
    ([handle, spent]) => Number(document.querySelector(`.agent[data-handle="${handle}"]`)?.dataset.spent) === spent,
    [HANDLE, before + 1_500_000], { timeout: 10000 });
  await page.locator('#events li[data-event="settle"]').first().waitFor({ timeout: 10000 });
  await page.waitForTimeout(600); // let the width transition finish before measuring
  const widthAfter = await row.locator(".bar .spent").evaluate((e) => e.getBoundingClientRect().width);
  if (!(widthAfter > widthBefore)) fail(`the bar did not grow: ${widthBefore} -> ${widthAfter}`);

  // Revoke through the button; it asks for a reason.
  page.once("dialog", (dialog) => {
    if (dialog.type() !== "prompt") fail("expected a prompt for the reason, got " + dialog.type());
    dialog.accept("runaway_loop");
  });
  await row.locator("button.revoke").click();
  await page.waitForFunction((handle) => document.querySelector(`.agent[data-handle="${handle}"]`)?.dataset.revoked === "runaway_loop",
    HANDLE, { timeout: 10000 });

  // The next payment is refused, and the refusal shows up live.
  const refused = await pay(100_000);
  if (refused.status !== 402 || refused.body.code !== "agent_revoked") fail(`expected a 402 agent_revoked, got ${refused.status} ${JSON.stringify(refused.body)}`);
  await page.locator('#events li[data-event="refuse"]').first().waitFor({ timeout: 10000 });
  await page.locator('#refusals tr[data-reason="agent_revoked"]').waitFor({ timeout: 10000 });
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  console.log(`dashboard test: ok (spent ${before} -> ${before + 1_500_000}, bar ${widthBefore.toFixed(1)}px -> ${widthAfter.toFixed(1)}px, revoked, refused)`);
} finally {
  await browser.close();
}
