// Numbers as the page shows them. Money arrives as decimal strings with ten places and is shown
// exactly, as the command line shows it: at least cents, and every further digit that is not zero.

export function usd(amount) {
  if (amount === null || amount === undefined) return "–";
  const [whole, fraction = ""] = String(amount).split(".");
  let digits = fraction.replace(/0+$/, "");
  if (digits.length < 2) digits = digits.padEnd(2, "0");
  return `$${whole}.${digits}`;
}

// Decimal strings compared exactly (as integers of 1e-10 USD), never as floats.
export function usdUnits(amount) {
  const [whole, fraction = ""] = String(amount).split(".");
  return BigInt(whole) * 10n ** 10n + BigInt(fraction.padEnd(10, "0").slice(0, 10) || "0");
}

export function count(value) {
  return Number(value).toLocaleString("en-US");
}

export function ms(value) {
  return value === null || value === undefined ? "–" : `${count(value)} ms`;
}

export function dateTime(iso) {
  return iso ? iso.replace("T", " ").replace(/:\d\d(\.\d+)?(\+00:00|Z)$/, " UTC") : "never";
}
