// What the signed-in key may see, decided once at sign-in from its own record.
//
// ``GET ../v1/usage/budget`` answers any valid key with its own fields: a 401 means the key is not
// valid, and its scope says which routes the page calls. An admin key reads /admin/usage*,
// /admin/keys; any other key reads /v1/usage*, which the gateway narrows to that key itself.

import { getJson } from "./api.js";

export async function whoAmI() {
  const own = await getJson("v1/usage/budget");
  const admin = own.key.scope === "admin";
  return {
    key: own.key,
    admin,
    usagePath: admin ? "admin/usage" : "v1/usage",
    latencyPath: admin ? "admin/usage/latency" : "v1/usage/latency",
    budgets: async () => (admin ? (await getJson("admin/usage/budgets")).data : [await getJson("v1/usage/budget")]),
  };
}
