// The range, bucket and grouping chosen in the controls, as the usage routes' query parameters.
// Times are UTC throughout, like the gateway's reports: a preset starts at the beginning of an
// hour or day; dates mean UTC midnights, and "until" is not included.

import { byId } from "./dom.js";

const PRESET_HOURS = { "24h": 24, "7d": 24 * 7, "30d": 24 * 30, "90d": 24 * 90 };
const STEP_MS = { hour: 3600_000, day: 86_400_000 };

export function chosenRange() {
  const preset = byId("range").value;
  const bucket = byId("bucket").value;
  const by = byId("group").value;
  if (preset === "custom") {
    const since = byId("since").value;
    const until = byId("until").value;
    if (!since) throw new Error("Choose a start date, or a preset range.");
    if (until && until < since) throw new Error("The end date comes before the start date.");
    return { since, until: until || null, bucket, by, label: `${since} – ${until || "now"} (UTC)` };
  }
  // N hours are the last N/bucket buckets, the current one included ("last 7 days" per day: today
  // and the 6 days before); never fewer than two, so "last 24 hours" per day shows yesterday too.
  const step = STEP_MS[bucket];
  const span = Math.max(PRESET_HOURS[preset] * 3600_000, 2 * step);
  const start = Math.floor((Date.now() - span + step) / step) * step;
  return { since: new Date(start).toISOString(), until: null, bucket, by, label: byId("range").selectedOptions[0].text };
}

export function showCustomInputs() {
  const custom = byId("range").value === "custom";
  for (const label of document.querySelectorAll("#range-form .custom")) label.hidden = !custom;
}
