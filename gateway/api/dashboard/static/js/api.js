// Calls to the gateway's own API with the signed-in key.
//
// The key lives in sessionStorage (this tab only, gone when it closes) and travels only in the
// Authorization header: never in a URL, so it appears in no address bar, history or access log.
// Paths are resolved against the dashboard's own address (…/dashboard/), never against "/", so the
// page works behind a reverse proxy that serves the gateway under a path prefix.

const STORAGE_KEY = "llama-gateway.api-key";

export function storedKey() {
  return sessionStorage.getItem(STORAGE_KEY);
}

export function storeKey(key) {
  sessionStorage.setItem(STORAGE_KEY, key);
}

export function forgetKey() {
  sessionStorage.removeItem(STORAGE_KEY);
}

export class ApiError extends Error {
  constructor(status, body) {
    const message = body?.error?.message ?? `The gateway answered ${status}.`;
    super(message);
    this.status = status;
    this.param = body?.error?.param ?? null;
  }
}

export function apiUrl(path, params = {}) {
  const url = new URL(`../${path}`, document.baseURI);
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, value);
  }
  return url;
}

export async function request(method, path, { params, body } = {}) {
  const headers = { Authorization: `Bearer ${storedKey() ?? ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(apiUrl(path, params), {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    credentials: "omit",
  });
  if (!response.ok) {
    let payload = null;
    try {
      payload = await response.json();
    } catch {
      // Not JSON (a proxy's own error page): the status says enough.
    }
    throw new ApiError(response.status, payload);
  }
  return response;
}

export async function getJson(path, params) {
  return (await request("GET", path, { params })).json();
}

export async function sendJson(method, path, body) {
  return (await request(method, path, { body })).json();
}
