// Small DOM helpers and the one number format of the page.

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

// One number format for search and compose alike: no exponent; whole numbers from 100 up
// (with thousands separators), three significant digits below.
export function formatDistance(d) {
  const x = Number(d);
  if (x === 0) return '0';
  if (Math.abs(x) >= 100) return Math.round(x).toLocaleString('en-US');
  if (Math.abs(x) >= 0.001) return x.toPrecision(3);
  return '<0.001';
}

export function formatMatch(p) {
  return p === null || p === undefined ? '–' : `${Math.round(p)}%`;
}

export const MATCH_HELP = 'Share of this index\'s best matches between patients that are at least '
  + 'this far: 100% is an exact match, about 50% a typical best match in another patient.';

export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} kB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

export function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (name === 'text') node.textContent = value;
    else if (name === 'className') node.className = value;
    else if (name === 'dataset') Object.assign(node.dataset, value);
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}
