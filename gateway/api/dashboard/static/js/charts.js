// Time series drawn with uPlot (vendored, MIT). The numbers people read (and compare) are in the
// tables beside each chart, straight from the API; the charts only draw their shape.

import uPlot from "../vendor/uplot/uPlot.esm.js";

const PALETTE = ["#2563eb", "#db2777", "#16a34a", "#ea580c", "#7c3aed", "#0891b2", "#ca8a04", "#dc2626", "#4b5563"];
const STEP_S = { hour: 3600, day: 86400 };
const MAX_POINTS = 24 * 100;

// Every bucket start (Unix seconds, UTC) from ``since`` up to ``until`` (or now), so that empty
// hours or days draw as zero instead of being skipped.
export function bucketTimes(bucket, since, until) {
  const step = STEP_S[bucket];
  const first = Math.floor(Date.parse(since) / 1000 / step) * step;
  const end = until ? Date.parse(until) / 1000 : Date.now() / 1000;
  const times = [];
  for (let t = first; t < end && times.length < MAX_POINTS; t += step) times.push(t);
  return times;
}

// Rows of a bucketed report ({bucket, group, label, ...}) as one series per group, in the order of
// ``groups`` (the unbucketed report's rows, as its table lists them).
export function seriesOf(rows, times, valueOf, groupsInOrder = []) {
  const index = new Map(times.map((t, i) => [t, i]));
  const groups = new Map();
  for (const row of groupsInOrder) {
    groups.set(row.group, { label: row.label ?? row.group, values: new Array(times.length).fill(0) });
  }
  for (const row of rows) {
    if (!groups.has(row.group)) {
      groups.set(row.group, { label: row.label ?? row.group, values: new Array(times.length).fill(0) });
    }
    const at = index.get(Date.parse(row.bucket) / 1000);
    if (at !== undefined) groups.get(row.group).values[at] += valueOf(row);
  }
  return [...groups.values()];
}

export function drawChart(container, times, series, { bucket, unit = "" }) {
  container.chart?.destroy();
  container.replaceChildren();
  const width = Math.max(container.clientWidth || 0, 320);
  const options = {
    width,
    height: 240,
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
    scales: { x: { time: true } },
    series: [
      { label: bucket === "hour" ? "hour (UTC)" : "day (UTC)" },
      ...series.map((s, i) => ({
        label: s.label,
        stroke: PALETTE[i % PALETTE.length],
        width: 2,
        points: { show: times.length <= 60 },
        value: (_, v) => (v === null || v === undefined ? "–" : `${unit}${v.toLocaleString("en-US")}`),
      })),
    ],
    axes: [{}, { size: 70, values: (_, ticks) => ticks.map((v) => `${unit}${v.toLocaleString("en-US")}`) }],
    legend: { live: true },
  };
  container.chart = new uPlot(options, [times, ...series.map((s) => s.values)], container);
}
