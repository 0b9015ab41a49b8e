// Drives the dashboard in headless Chromium (run by tests/it/dashboard.rs, which starts the
// daemon, runs the `spendcap demo` scenario against it and passes BASE, ADMIN_TOKEN, AGENT_TOKEN,
// HANDLE and SCREENSHOT in the environment). Exits non-zero with a message on the first
// expectation that fails.
import { chromium } from "playwright-core";

const { BASE, ADMIN_TOKEN, AGENT_TOKEN, HANDLE, SCREENSHOT } = process.env;
const fail = (message) => { console.error("dashboard test: " + message); process.exit(1); };
const expect = (ok, message) => { if (!ok) fail(message); };

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
async function admin(path) {
  const response = await fetch(`${BASE}${path}`, { headers: { Authorization: `Bearer ${ADMIN_TOKEN}` } });
  return response.json();
}
const rowOf = (page, handle) => page.locator(`.agent[data-handle="${handle}"]`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run"],
});
const seen = [];
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on("pageerror", (e) => fail("page error: " + e.message));
  await page.goto(`${BASE}/dashboard`);
  // Nothing but the login form before the token is accepted.
  expect(await page.locator("#app").isHidden(), "the panels are hidden before login");
  await page.fill("#token", "not-the-token");
  await page.click("#login-form button[type=submit]");
  await page.locator("#login-error").filter({ hasText: "not accepted" }).waitFor({ timeout: 10000 });
  expect(await page.locator("#app").isHidden(), "the panels stay hidden after a wrong token");
  await page.fill("#token", ADMIN_TOKEN);
  await page.click("#login-form button[type=submit]");
  const row = rowOf(page, HANDLE);
  await row.waitFor({ timeout: 10000 });
  expect((await page.textContent("#role")) === "role: admin", "the session's role is shown");

  // Recent events are backfilled from the log the demo wrote (no payment has happened since).
  const log = (await (await fetch(`${BASE}/v1/log`, { headers: { Authorization: `Bearer ${ADMIN_TOKEN}` } })).text()).trim().split("\n");
  await page.waitForFunction((n) => document.querySelectorAll("#events li").length >= n, Math.min(100, log.length), { timeout: 10000 });
  expect(await page.locator("#events-empty").isHidden(), "no empty state over a backfilled list");
  seen.push(`backfilled ${await page.locator("#events li").count()} of ${log.length} log entries`);

  // Totals agree with the API; trees are headed by their root's handle; the chart has bars.
  const agents = (await admin("/v1/agents")).agents;
  const spent = agents.filter((a) => !a.parent).reduce((s, a) => s + a.spent_micros, 0);
  await page.waitForFunction((v) => document.querySelector('[data-total="spent"]')?.dataset.value === String(v), spent, { timeout: 10000 });
  const revokedCount = agents.filter((a) => a.state === "revoked").length;
  expect(await page.getAttribute('[data-total="revoked"]', "data-value") === String(revokedCount), "revoked total");
  const heads = await page.locator(".tree-label").allTextContents();
  expect(heads.some((h) => h.startsWith("research")), "a tree headed by research: " + heads.join(" | "));
  await page.locator("#spend-chart svg rect").first().waitFor({ timeout: 10000 });
  expect(await page.locator('#spend-legend [data-series="research"]').count() === 1, "research in the chart's legend");
  await page.selectOption("#series-by", "protocol");
  await page.locator('#spend-legend [data-series="x402"]').waitFor({ timeout: 10000 });
  await page.selectOption("#series-by", "agent");
  const research = agents.find((a) => a.handle === "research");
  expect(await rowOf(page, "research").locator(".id").textContent() === research.id, "the full agent id is shown");

  const before = Number(await row.getAttribute("data-spent"));
  const widthBefore = await row.locator(".bar .spent").evaluate((e) => e.getBoundingClientRect().width);
  await page.waitForFunction(() => document.getElementById("live-text").textContent === "live", null, { timeout: 10000 });

  // A payment moves the agent's bar (through the live event stream; no reload).
  const paid = await pay(1_500_000);
  if (paid.status !== 200) fail(`payment failed: ${paid.status} ${JSON.stringify(paid.body)}`);
  await page.waitForFunction(
    ([handle, spent]) => Number(document.querySelector(`.agent[data-handle="${handle}"]`)?.dataset.spent) === spent,
    [HANDLE, before + 1_500_000], { timeout: 10000 });
  await page.locator('#events li.fresh[data-event="settle"]').first().waitFor({ timeout: 10000 });
  await page.waitForTimeout(600); // let the width transition finish before measuring
  const widthAfter = await row.locator(".bar .spent").evaluate((e) => e.getBoundingClientRect().width);
  if (!(widthAfter > widthBefore)) fail(`the bar did not grow: ${widthBefore} -> ${widthAfter}`);
  seen.push(`bar ${widthBefore.toFixed(1)}px -> ${widthAfter.toFixed(1)}px`);

  // Create a sub-agent of research through the form (its token is shown once, in an alert).
  await page.click("#create-agent");
  await page.fill('#form-fields input[name="handle"]', "research-sub");
  await page.fill('#form-fields input[name="cap"]', "0.50");
  await page.selectOption('#form-fields select[name="parent"]', research.id);
  await page.fill('#form-fields input[name="labels"]', "team=search");
  let tokenShown = "";
  page.once("dialog", (dialog) => { tokenShown = dialog.message(); dialog.accept(); });
  await page.click("#form-submit");
  const sub = rowOf(page, "research-sub");
  await sub.waitFor({ timeout: 10000 });
  expect(/sct_ag_/.test(tokenShown), "the new agent's token was shown once: " + tokenShown);
  await page.locator('#events li[data-event="create"] .what').filter({ hasText: /^research-sub$/ }).waitFor({ timeout: 10000 });
  // The demo's looper is suspended and then revoked: nothing to reinstate or revoke there.
  expect(await rowOf(page, "looper").locator("button.reinstate, button.revoke").count() === 0, "no Reinstate or Revoke on a revoked agent");

  // Change its cap.
  await sub.locator("button.set-cap").click();
  await page.fill('#form-fields input[name="cap"]', "0.75");
  await page.click("#form-submit");
  await page.waitForFunction(() => document.querySelector('.agent[data-handle="research-sub"]')?.dataset.cap === "750000", null, { timeout: 10000 });
  const shownCap = (await admin("/v1/agents/research-sub")).cap_micros;
  expect(shownCap === 750000, "the cap changed in the daemon: " + shownCap);
  // A bad cap is refused in the form, and nothing changes.
  await sub.locator("button.set-cap").click();
  await page.fill('#form-fields input[name="cap"]', "0.1234567");
  await page.click("#form-submit");
  await page.locator("#form-error").filter({ hasText: "dollar amount" }).waitFor({ timeout: 10000 });
  await page.click("#form-cancel");

  // Search by label, and by handle.
  await page.fill("#search", "team=search");
  await page.waitForFunction(() => document.querySelectorAll(".agent").length === 1, null, { timeout: 10000 });
  expect(await sub.isVisible(), "the label search finds research-sub");
  await page.fill("#search", "looper");
  await page.waitForFunction(() => [...document.querySelectorAll(".agent")].every((r) => r.dataset.handle.includes("looper")), null, { timeout: 10000 });
  await page.fill("#search", "");

  // Revoke the parent through its button; its sub-agent shows the inherited state.
  page.once("dialog", (dialog) => {
    if (dialog.type() !== "prompt") fail("expected a prompt for the reason, got " + dialog.type());
    dialog.accept("runaway_loop");
  });
  await rowOf(page, "research").locator("button.revoke").click();
  await page.waitForFunction(() => {
    const r = document.querySelector('.agent[data-handle="research-sub"]');
    return r?.dataset.state === "revoked" && r.dataset.via === "research";
  }, null, { timeout: 10000 });
  expect(await sub.locator("button.revoke").count() === 0, "no Revoke button on an agent revoked through its parent");
  expect((await sub.locator(".badge.via").textContent()) === "revoked via research", "a 'via research' tag");
  expect(await rowOf(page, "research").locator("button.revoke").count() === 0, "no Revoke button on the revoked parent");
  await page.selectOption("#state-filter", "revoked");
  await page.waitForFunction(() => [...document.querySelectorAll(".agent")].every((r) => r.dataset.state === "revoked"), null, { timeout: 10000 });
  expect(await sub.isVisible(), "the state filter keeps research-sub");
  await page.selectOption("#state-filter", "");

  // Revoke the paying agent; its next payment is refused, and the refusal shows up live.
  page.once("dialog", (dialog) => dialog.accept("runaway_loop"));
  await row.locator("button.revoke").click();
  await page.waitForFunction((handle) => document.querySelector(`.agent[data-handle="${handle}"]`)?.dataset.revoked === "runaway_loop",
    HANDLE, { timeout: 10000 });
  const refused = await pay(100_000);
  if (refused.status !== 402 || refused.body.code !== "agent_revoked") fail(`expected a 402 agent_revoked, got ${refused.status} ${JSON.stringify(refused.body)}`);
  await page.locator('#events li.fresh[data-event="refuse"]').first().waitFor({ timeout: 10000 });
  await page.locator('#refusals tr[data-reason="agent_revoked"]').waitFor({ timeout: 10000 });
  await page.waitForTimeout(600);
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  console.log(`dashboard test: ok (${seen.join("; ")}; created research-sub, cap 0.75, research revoked -> research-sub revoked via research; ${HANDLE} revoked and refused)`);
} finally {
  await browser.close();
}
