// The usage views: totals, spend and tokens over time, requests by status, latency, top keys and
// budgets, each from the API for the chosen range. Tables show the API's numbers exactly.

import { getJson } from "./api.js";
import { bucketTimes, drawChart, seriesOf } from "./charts.js";
import { byId, el, fillTable } from "./dom.js";
import { count, ms, usd, usdUnits } from "./format.js";

const TOP_KEYS = 10;

function groupName(row) {
  return row.label ?? row.group;
}

export async function loadBoard(who, range) {
  const filters = { since: range.since, until: range.until };
  const path = who.usagePath;
  const calls = [
    getJson(path, { ...filters, group_by: range.by, bucket: range.bucket }),
    getJson(path, { ...filters, group_by: range.by }),
    getJson(path, { ...filters, group_by: "status", bucket: range.bucket }),
    getJson(path, { ...filters, group_by: "status" }),
    getJson(who.latencyPath, { ...filters, group_by: range.by }),
    who.budgets(),
    who.admin ? getJson(path, { ...filters, group_by: "key" }) : null,
  ];
  const [series, summary, statusSeries, statuses, latency, budgets, byKey] = await Promise.all(calls);
  byId("range-label").textContent = `(${range.label})`;
  showTotals(summary.total);
  const times = bucketTimes(range.bucket, range.since, range.until);
  drawChart(byId("spend-chart"), times, seriesOf(series.data, times, (r) => Number(r.total_cost_usd), summary.data), {
    bucket: range.bucket,
    unit: "$",
  });
  drawChart(byId("tokens-chart"), times, seriesOf(series.data, times, (r) => r.total_tokens, summary.data), { bucket: range.bucket });
  drawChart(byId("status-chart"), times, seriesOf(statusSeries.data, times, (r) => r.requests, statuses.data), {
    bucket: range.bucket,
  });
  showSeriesTable(summary, range.by);
  showStatuses(statuses);
  showLatency(latency, range.by);
  showBudgets(budgets);
  byId("top-keys-section").hidden = !who.admin;
  if (byKey) showTopKeys(byKey);
}

function showTotals(total) {
  byId("total-requests").textContent = count(total.requests);
  byId("total-tokens").textContent = count(total.total_tokens);
  byId("total-spend").textContent = usd(total.total_cost_usd);
}

function usageCells(row) {
  return [
    count(row.requests),
    count(row.prompt_tokens),
    count(row.completion_tokens),
    count(row.total_tokens),
    usd(row.total_cost_usd),
  ];
}

const USAGE_HEADERS = ["requests", "prompt tokens", "completion tokens", "total tokens", "spend"];

function showSeriesTable(report, by) {
  const rows = report.data.map((row) => ({ dataset: { group: row.group }, cells: [groupName(row), ...usageCells(row)] }));
  rows.push({ dataset: { group: "total" }, cells: ["total", ...usageCells(report.total)] });
  fillTable(byId("series-table"), [by, ...USAGE_HEADERS], rows);
}

function showStatuses(report) {
  const rows = report.data.map((row) => ({ dataset: { group: row.group }, cells: [row.group, ...usageCells(row)] }));
  fillTable(byId("status-table"), ["status", ...USAGE_HEADERS], rows);
}

function showLatency(report, by) {
  const cells = (row) => [
    count(row.requests),
    ms(row.ttft.p50_ms),
    ms(row.ttft.p90_ms),
    ms(row.ttft.p99_ms),
    ms(row.duration.p50_ms),
    ms(row.duration.p90_ms),
    ms(row.duration.p99_ms),
  ];
  const rows = report.data.map((row) => ({ dataset: { group: row.group }, cells: [groupName(row), ...cells(row)] }));
  if (report.data.length) rows.push({ dataset: { group: "total" }, cells: ["all", ...cells(report.total)] });
  const headers = [by, "requests", "TTFT p50", "TTFT p90", "TTFT p99", "duration p50", "duration p90", "duration p99"];
  fillTable(byId("latency-table"), headers, rows);
}

function showTopKeys(report) {
  const top = [...report.data]
    .sort((a, b) => {
      const diff = usdUnits(b.total_cost_usd) - usdUnits(a.total_cost_usd);
      return diff > 0n ? 1 : diff < 0n ? -1 : b.requests - a.requests;
    })
    .slice(0, TOP_KEYS);
  const rows = top.map((row) => ({ dataset: { group: row.group }, cells: [groupName(row), row.group, ...usageCells(row)] }));
  fillTable(byId("top-keys"), ["key", "id", ...USAGE_HEADERS], rows);
}

function showBudgets(statuses) {
  const rows = statuses.map((status) => {
    const key = status.key;
    const budget = key.budget_usd;
    const meter = budget
      ? el("meter", {
          min: 0,
          max: Number(budget) || 1,
          value: Number(status.spent_usd),
          high: (Number(budget) || 1) * 0.8,
          title: `${usd(status.spent_usd)} of ${usd(budget)}`,
        })
      : "no budget";
    return {
      dataset: { key: key.id },
      cells: [key.name, key.budget_period, budget ? usd(budget) : "–", usd(status.spent_usd), usd(status.remaining_usd), meter],
    };
  });
  fillTable(byId("budgets-table"), ["key", "period", "budget", "spent", "left", "used"], rows, "No keys.");
}
