// Building DOM nodes from data. Every value becomes a text node (textContent), never markup:
// key names, models and error messages come from users and must not run as HTML.

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "className") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "onClick") node.addEventListener("click", value);
    else if (name.startsWith("on") || name === "style") {
      throw new Error(`el() does not set ${name}`);
    } else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function byId(id) {
  return document.getElementById(id);
}

// A table's head and body; ``rows`` are arrays of cells (strings or nodes), or {cells, dataset}.
export function fillTable(table, headers, rows, empty = "Nothing in this range.") {
  const head = el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h))));
  const body = el("tbody");
  for (const row of rows) {
    const cells = Array.isArray(row) ? row : row.cells;
    const dataset = Array.isArray(row) ? undefined : row.dataset;
    body.append(el("tr", { dataset }, cells.map((cell) => el("td", {}, cell))));
  }
  if (rows.length === 0) body.append(el("tr", {}, el("td", { colspan: headers.length, className: "muted" }, empty)));
  table.replaceChildren(head, body);
}
