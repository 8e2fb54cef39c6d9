// The dashboard's entry point: sign-in, the range controls, and loading every view.

import { ApiError, forgetKey, request, storedKey, storeKey } from "./api.js";
import { loadBoard } from "./board.js";
import { byId } from "./dom.js";
import { hideNewKey, loadKeys, wireKeyForms } from "./keys.js";
import { chosenRange, showCustomInputs } from "./range.js";
import { whoAmI } from "./session.js";

let who = null;

function report(message, isError = false) {
  const line = byId("status-line");
  line.textContent = message;
  line.classList.toggle("error", isError);
}

function showSignIn(message = "") {
  who = null;
  hideNewKey();
  byId("board").hidden = true;
  byId("sign-out").hidden = true;
  byId("whoami").textContent = "";
  byId("sign-in").hidden = false;
  byId("sign-in-error").textContent = message;
  byId("api-key").focus();
}

/** The chosen range, or null after saying on the page why it is not valid. */
function rangeOrReport() {
  try {
    return chosenRange();
  } catch (error) {
    report(error.message, true);
    return null;
  }
}

async function refresh() {
  const range = rangeOrReport();
  if (range === null) return;
  report("Loading…");
  document.body.dataset.state = "loading";
  try {
    await Promise.all([loadBoard(who, range), who.admin ? loadKeys(refresh) : null]);
    report(`Updated ${new Date().toISOString().slice(0, 19).replace("T", " ")} UTC.`);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      forgetKey();
      showSignIn("The key is no longer valid.");
      return;
    }
    report(error.message, true);
  } finally {
    document.body.dataset.state = "ready";
  }
}

async function start() {
  try {
    who = await whoAmI();
  } catch (error) {
    forgetKey();
    showSignIn(error instanceof ApiError && error.status === 401 ? "That key is not valid." : error.message);
    return;
  }
  byId("sign-in").hidden = true;
  byId("board").hidden = false;
  byId("sign-out").hidden = false;
  byId("whoami").textContent = `${who.key.name} (${who.key.prefix}, ${who.admin ? "admin" : "own usage"})`;
  byId("keys-section").hidden = !who.admin;
  byId("group").querySelector('option[value="key"]').hidden = !who.admin;
  if (!who.admin) byId("group").value = "model";
  await refresh();
}

async function exportCsv() {
  const range = rangeOrReport();
  if (range === null) return;
  const params = { since: range.since, until: range.until, group_by: range.by, bucket: range.bucket, format: "csv" };
  try {
    const response = await request("GET", who.usagePath, { params });
    const disposition = response.headers.get("content-disposition") ?? "";
    const name = /filename="([^"]+)"/.exec(disposition)?.[1] ?? "usage.csv";
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = name;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  } catch (error) {
    report(error.message, true);
  }
}

byId("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = byId("api-key").value.trim();
  byId("api-key").value = "";
  if (!key) return;
  storeKey(key);
  await start();
});
byId("sign-out").addEventListener("click", () => {
  forgetKey();
  showSignIn();
});
byId("range-form").addEventListener("submit", (event) => {
  event.preventDefault();
  refresh();
});
byId("range").addEventListener("change", showCustomInputs);
byId("export-csv").addEventListener("click", exportCsv);
wireKeyForms(refresh, report);

if (storedKey()) start();
else showSignIn();
