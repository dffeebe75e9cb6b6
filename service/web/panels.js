// Image panels: every image with its R/L and A/P markers where its orientation is known, the predicted lesion with its
// legend, and the warnings of a search.

import { $, $$, el } from './dom.js';

const LESION_NAMES = { TC: 'necrotic core', ED: 'edema', ET: 'enhancing' };

export function lesionLegend(pixels) {
  const node = el('div', { className: 'legend lesion-legend' });
  node.append($('#lesion-legend-template').content.cloneNode(true));
  if (pixels) {
    const spans = $$('.legend-item > span:not(.swatch)', node);
    Object.keys(LESION_NAMES).forEach((name, i) => {
      const count = pixels[name].toLocaleString('en-US');
      spans[i].textContent = `${name} ${LESION_NAMES[name]}: ${count} px`;
    });
  }
  return node;
}

// The predicted lesion, in colour with its legend, or said in words when there is none.
export function lesionFigure(src, role, caption, alt, pixels, { oriented = true } = {}) {
  const fig = figure(src, role, caption, alt, { oriented });
  const total = pixels ? Object.values(pixels).reduce((a, b) => a + b, 0) : 0;
  fig.append(total > 0 ? lesionLegend(pixels)
    : el('p', { className: 'no-lesion', text: 'No lesion predicted' }));
  fig.dataset.lesionPixels = String(total);
  return fig;
}

export function showWarnings(node, warnings) {
  node.replaceChildren(...(warnings ?? []).map((w) => el('li', { text: w })));
  node.hidden = !(warnings && warnings.length);
}

// R/L and A/P as the preprocessing draws a slice: radiological view, the patient's right on
// the image's left, anterior at the top.
export function orientationMarkers() {
  return [['top', 'A'], ['bottom', 'P'], ['left', 'R'], ['right', 'L']].map(
    ([side, text]) => el('span', { className: `ori ori-${side}`, text, 'aria-hidden': 'true' }));
}

// `oriented`: whether the image's orientation is known (a volume, a DICOM file, an indexed
// slice); a PNG or JPEG upload says nothing of it, so it gets no markers.
export function figure(src, role, caption, alt, { id, title, oriented = true } = {}) {
  const img = el('img', { src, alt, id, dataset: { role }, decoding: 'async' });
  const frame = el('div', { className: 'oriented' },
    oriented ? [img, ...orientationMarkers()] : [img]);
  const figcaption = el('figcaption', { text: caption });
  return el('figure', { className: 'panel-figure', title }, [frame, figcaption]);
}
