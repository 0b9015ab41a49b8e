// The dashboard with a viewer and with an operator token, in headless Chromium (run by
// tests/it/dashboard.rs, which creates the agents, a payment waiting for approval and the two
// tokens, and passes BASE, ADMIN_TOKEN, VIEWER_TOKEN, OPERATOR_TOKEN, APPROVAL_ID and SCREENSHOT).
// A viewer sees everything and is offered no action (and the daemon refuses one forced from the
// page); an operator is offered revoke, reinstate, approval decisions, a lower cap and tighter
// controls, never "New agent", and a raise is refused with a clear message. Exits non-zero with a
// message on the first expectation that fails.
import { chromium } from "playwright-core";

const { BASE, ADMIN_TOKEN, VIEWER_TOKEN, OPERATOR_TOKEN, APPROVAL_ID, SCREENSHOT } = process.env;
const fail = (message) => { console.error("roles dashboard test: " + message); process.exit(1); };
const expect = (ok, message) => { if (!ok) fail(message); };
const rowOf = (page, handle) => page.locator(`.agent[data-handle="${handle}"]`);
const ACTIONS = "#create-agent, button.set-cap, button.set-controls, button.revoke, button.reinstate, button.approve, button.deny";
async function admin(path) {
  const response = await fetch(`${BASE}${path}`, { headers: { Authorization: `Bearer ${ADMIN_TOKEN}` } });
  return response.json();
}
// Calls the API from the page with the token the page holds, as a script in it could.
const forced = (page, method, path, body) => page.evaluate(async ([method, path, body]) => {
  const response = await fetch(path, {
    method, body: JSON.stringify(body),
    headers: { Authorization: "Bearer " + sessionStorage.getItem("spendcap_admin_token"), "Content-Type": "application/json" },
  });
  return { status: response.status, body: await response.json() };
}, [method, path, body]);

async function open(browser, token) {
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await context.newPage();
  page.on("pageerror", (e) => fail("page error: " + e.message));
  await page.goto(`${BASE}/dashboard`);
  await page.fill("#token", token);
  await page.click("#login-form button[type=submit]");
  await rowOf(page, "ops-agent").waitFor({ timeout: 10000 });
  return page;
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run"],
});
const seen = [];
try {
  const agent = (await admin("/v1/agents/ops-agent"));

  // ---- A viewer: agents, events, reports and the waiting approval; not one action. ----------
  const viewer = await open(browser, VIEWER_TOKEN);
  expect((await viewer.textContent("#role")) === "role: viewer", "the viewer's role is shown");
  await viewer.waitForFunction(() => document.querySelectorAll("#events li").length > 0, null, { timeout: 10000 });
  await viewer.locator(`#approvals .approval[data-approval="${APPROVAL_ID}"]`).waitFor({ timeout: 10000 });
  await viewer.locator("#cap-rule").filter({ hasText: "Rule:" }).waitFor({ timeout: 10000 });
  expect(await viewer.getAttribute('[data-total="agents"]', "data-value") === "3", "the viewer sees the three agents");
  expect(await viewer.locator(ACTIONS).count() === 0, "a viewer is offered no action");
  const revoke = await forced(viewer, "POST", `/v1/agents/${agent.id}/revoke`, { reason: "forced" });
  expect(revoke.status === 403 && revoke.body.code === "role_forbidden", "a forced revoke is refused: " + JSON.stringify(revoke));
  const lower = await forced(viewer, "PUT", `/v1/agents/${agent.id}/cap`, { cap_micros: 1 });
  expect(lower.status === 403 && lower.body.code === "role_forbidden", "a forced cap change is refused: " + JSON.stringify(lower));
  const approve = await forced(viewer, "POST", `/v1/approvals/${APPROVAL_ID}/approve`, { note: "forced" });
  expect(approve.status === 403, "a forced approval is refused: " + JSON.stringify(approve));
  const after = await admin("/v1/agents/ops-agent");
  expect(after.state === "active" && after.cap_micros === agent.cap_micros, "nothing changed: " + JSON.stringify(after));
  seen.push("viewer: no action offered, forced revoke/cap/approve refused 403");

  // ---- An operator: stops and tightens; never creates, never raises. -------------------------
  const operator = await open(browser, OPERATOR_TOKEN);
  expect((await operator.textContent("#role")) === "role: operator", "the operator's role is shown");
  expect(await operator.locator("#create-agent").count() === 0, "no New agent for an operator");
  const row = rowOf(operator, "ops-agent");
  for (const button of ["button.set-cap", "button.set-controls", "button.revoke"]) {
    expect(await row.locator(button).count() === 1, `${button} offered to an operator`);
  }
  expect(await rowOf(operator, "ops-looper").locator("button.reinstate").count() === 1, "Reinstate on the suspended agent");
  await operator.locator(`button.approve[data-approval="${APPROVAL_ID}"]`).waitFor({ timeout: 10000 });
  expect(await operator.locator(`button.deny[data-approval="${APPROVAL_ID}"]`).count() === 1, "Deny offered");

  // Lowering the cap works from the form.
  await row.locator("button.set-cap").click();
  expect((await operator.textContent("#form-title")).startsWith("Lower the cap"), "the form says lower only");
  await operator.fill('#form-fields input[name="cap"]', "4.00");
  await operator.click("#form-submit");
  await operator.waitForFunction(() => document.querySelector('.agent[data-handle="ops-agent"]')?.dataset.cap === "4000000", null, { timeout: 10000 });
  expect((await admin("/v1/agents/ops-agent")).cap_micros === 4_000_000, "the daemon lowered the cap");
  // Raising it is refused with a clear message, and nothing changes.
  await row.locator("button.set-cap").click();
  await operator.fill('#form-fields input[name="cap"]', "9.00");
  await operator.click("#form-submit");
  await operator.locator("#form-error").filter({ hasText: "may only lower a cap" }).waitFor({ timeout: 10000 });
  const message = await operator.textContent("#form-error");
  await operator.click("#form-cancel");
  const raise = await forced(operator, "PUT", `/v1/agents/${agent.id}/cap`, { cap_micros: 9_000_000 });
  expect(raise.status === 403 && raise.body.code === "role_forbidden" && /only lower a cap/.test(raise.body.detail),
    "a forced raise is refused by the daemon: " + JSON.stringify(raise));
  expect((await admin("/v1/agents/ops-agent")).cap_micros === 4_000_000, "the cap stayed lowered");
  const create = await forced(operator, "POST", "/v1/agents", { handle: "not-allowed", cap_micros: 1 });
  expect(create.status === 403 && create.body.code === "role_forbidden", "a forced create is refused: " + JSON.stringify(create));
  seen.push(`operator: cap 5.00 -> 4.00 from the form, 9.00 refused ("${message}")`);

  // Tighter controls from the form keep the approval rule.
  await row.locator("button.set-controls").click();
  await operator.fill('#form-fields input[name="daily"]', "3.00");
  await operator.click("#form-submit");
  await operator.locator("#form-dialog").waitFor({ state: "hidden", timeout: 10000 });
  const controls = await admin(`/v1/agents/${agent.id}/controls`);
  expect(controls.limits.daily === 3_000_000 && controls.approval && controls.approval.above_micros === 1_000_000,
    "daily limit set, approval rule kept: " + JSON.stringify(controls));

  // Approve the waiting payment, reinstate the suspended agent, revoke another.
  operator.once("dialog", (dialog) => dialog.accept("checked by the operator"));
  await operator.click(`button.approve[data-approval="${APPROVAL_ID}"]`);
  await operator.locator(`#approvals .approval[data-approval="${APPROVAL_ID}"]`).waitFor({ state: "detached", timeout: 10000 });
  const decided = await admin(`/v1/approvals/${APPROVAL_ID}`);
  expect(decided.state === "approved" && decided.by === "otto", "approved by otto: " + JSON.stringify(decided));
  await rowOf(operator, "ops-looper").locator("button.reinstate").click();
  await operator.waitForFunction(() => document.querySelector('.agent[data-handle="ops-looper"]')?.dataset.state === "active", null, { timeout: 10000 });
  operator.once("dialog", (dialog) => dialog.accept("operator_stop"));
  await rowOf(operator, "ops-target").locator("button.revoke").click();
  await operator.waitForFunction(() => document.querySelector('.agent[data-handle="ops-target"]')?.dataset.revoked === "operator_stop", null, { timeout: 10000 });
  seen.push("operator: approved, reinstated, revoked from the page");
  await operator.waitForTimeout(300);
  await operator.screenshot({ path: SCREENSHOT, fullPage: true });
  console.log(`roles dashboard test: ok (${seen.join("; ")})`);
} finally {
  await browser.close();
}
