// Key management for admin keys, through the admin API: list, create (the plaintext key is shown
// once), change limits, budget and expiry, and revoke.

import { ApiError, getJson, request, sendJson } from "./api.js";
import { byId, el, fillTable } from "./dom.js";
import { count, dateTime, usd } from "./format.js";

let editing = null;

function limitOrNull(text) {
  return text.trim() === "" ? null : Number(text);
}

function modelsOrNull(text) {
  const names = text.split(",").map((name) => name.trim()).filter(Boolean);
  return names.length ? names : null;
}

function expiryOrNull(date) {
  return date ? `${date}T00:00:00Z` : null;
}

// The limit fields of a form whose inputs are named ``${prefix}-rpm`` and so on.
function limitFields(prefix) {
  const budget = byId(`${prefix}-budget`).value.trim().replace(/^\$/, "");
  return {
    allowed_models: modelsOrNull(byId(`${prefix}-models`).value),
    rpm: limitOrNull(byId(`${prefix}-rpm`).value),
    tpm: limitOrNull(byId(`${prefix}-tpm`).value),
    max_concurrency: limitOrNull(byId(`${prefix}-concurrency`).value),
    budget_usd: budget === "" ? null : budget,
    budget_period: byId(`${prefix}-period`).value,
    expires_at: expiryOrNull(byId(`${prefix}-expires`).value),
  };
}

export async function loadKeys(onChange) {
  const keys = (await getJson("admin/keys", { include_revoked: "true" })).data;
  const rows = keys.map((key) => {
    const active = key.status === "active";
    const actions = active
      ? [
          el("button", { type: "button", className: "edit", onClick: () => openEditor(key) }, "Edit"),
          el("button", { type: "button", className: "revoke", onClick: () => revoke(key, onChange) }, "Revoke"),
        ]
      : [];
    return {
      dataset: { key: key.id, status: key.status },
      cells: [
        key.name,
        key.prefix,
        key.scope,
        key.status,
        key.allowed_models ? key.allowed_models.join(", ") : "all",
        key.rpm === null ? "–" : count(key.rpm),
        key.tpm === null ? "–" : count(key.tpm),
        key.max_concurrency === null ? "–" : count(key.max_concurrency),
        key.budget_usd === null ? "–" : `${usd(key.budget_usd)} ${key.budget_period}`,
        dateTime(key.expires_at),
        el("span", { className: "actions" }, actions),
      ],
    };
  });
  const headers = ["name", "key", "scope", "status", "models", "RPM", "TPM", "concurrency", "budget", "expires", ""];
  fillTable(byId("keys-table"), headers, rows, "No keys.");
}

export function wireKeyForms(onChange, report) {
  byId("create-key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const fields = { name: byId("new-name").value, scope: byId("new-scope").value, ...limitFields("new") };
    try {
      const created = await sendJson("POST", "admin/keys", fields);
      byId("create-key-form").reset();
      showNewKey(created.key);
      await onChange();
      report(`Created key ${created.name}.`);
    } catch (error) {
      report(error.message, true);
    }
  });
  byId("copy-key").addEventListener("click", copyNewKey);
  byId("dismiss-key").addEventListener("click", hideNewKey);
  byId("edit-key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    if (event.submitter?.value !== "save") {
      byId("edit-key-dialog").close();
      return;
    }
    try {
      await sendJson("PATCH", `admin/keys/${encodeURIComponent(editing.id)}`, limitFields("edit"));
      byId("edit-key-dialog").close();
      await onChange();
      report(`Changed key ${editing.name}.`);
    } catch (error) {
      byId("edit-error").textContent = error.message;
    }
  });
}

function showNewKey(plaintext) {
  byId("new-key-value").textContent = plaintext;
  byId("copy-result").textContent = "";
  byId("new-key").hidden = false;
}

// The plaintext leaves the page once dismissed (or on sign-out): the gateway cannot show it again.
export function hideNewKey() {
  byId("new-key-value").textContent = "";
  byId("copy-result").textContent = "";
  byId("new-key").hidden = true;
}

async function copyNewKey() {
  const value = byId("new-key-value").textContent;
  try {
    await navigator.clipboard.writeText(value);
    byId("copy-result").textContent = "Copied.";
  } catch {
    // Without clipboard access (an insecure origin): select it, so that a keyboard copy takes it.
    const range = document.createRange();
    range.selectNodeContents(byId("new-key-value"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    byId("copy-result").textContent = "Selected: press Ctrl+C (or ⌘C) to copy.";
  }
}

function openEditor(key) {
  editing = key;
  byId("edit-key-name").textContent = key.name;
  byId("edit-models").value = key.allowed_models ? key.allowed_models.join(", ") : "";
  byId("edit-rpm").value = key.rpm ?? "";
  byId("edit-tpm").value = key.tpm ?? "";
  byId("edit-concurrency").value = key.max_concurrency ?? "";
  byId("edit-budget").value = key.budget_usd ?? "";
  byId("edit-period").value = key.budget_period;
  byId("edit-expires").value = key.expires_at ? key.expires_at.slice(0, 10) : "";
  byId("edit-error").textContent = "";
  byId("edit-key-dialog").showModal();
}

async function revoke(key, onChange) {
  if (!confirm(`Revoke key ${key.name} (${key.prefix})? Requests with it stop at once.`)) return;
  try {
    await request("POST", `admin/keys/${encodeURIComponent(key.id)}/revoke`);
    await onChange();
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    byId("status-line").textContent = error.message;
  }
}
