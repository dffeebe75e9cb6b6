// The neighbour grid: one card per hit with its image, label overlay, per-position distance
// map (one scale for the whole grid, with its legend) and "more like this".

import { ApiError, failureText, fetchObjectURL } from './api.js';
import { $, el, formatDistance, formatMatch, MATCH_HELP } from './dom.js';

// Alpha = value / max, with one max for the whole grid, so maps compare across cards.
function drawPositionMap(canvas, map, max) {
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const rows = map.length;
  const cols = rows ? map[0].length : 0;
  if (!rows || !cols || !(max > 0)) return;
  const cw = canvas.width / cols;
  const ch = canvas.height / rows;
  for (let r = 0; r < rows; r += 1) {
    for (let c = 0; c < cols; c += 1) {
      const share = Math.max(0, map[r][c]) / max;
      ctx.fillStyle = `rgba(255, 110, 40, ${(0.8 * share).toFixed(3)})`;
      ctx.fillRect(c * cw, r * ch, cw, ch);
    }
  }
  ctx.strokeStyle = 'rgba(255, 255, 255, 0.12)';
  ctx.lineWidth = 1;
  for (let i = 1; i < cols; i += 1) ctx.strokeRect(i * cw, 0, 0, canvas.height);
  for (let i = 1; i < rows; i += 1) ctx.strokeRect(0, i * ch, canvas.width, 0);
}

function badgeFor(hasAbnormality) {
  if (hasAbnormality === true) return ['lesion', 'badge lesion'];
  if (hasAbnormality === false) return ['no lesion', 'badge clear'];
  return ['unlabelled', 'badge unknown'];
}

export class NeighborGrid {
  // onSimilar(neighbor): "more like this"; onError(text, err): a failure the page shows.
  constructor(container, countNode, mapLegend, { onSimilar, onError }) {
    this.onSimilar = onSimilar;
    this.onError = onError;
    this.container = container;
    this.countNode = countNode;
    this.mapLegend = mapLegend;
    this.objectURLs = [];
    this.controller = new AbortController();
    this.cards = [];
  }

  clear() {
    this.controller.abort();
    this.controller = new AbortController();
    while (this.objectURLs.length) URL.revokeObjectURL(this.objectURLs.pop());
    this.cards = [];
    this.container.replaceChildren();
    this.countNode.textContent = '';
    this.mapLegend.replaceChildren();
  }

  render(neighbors) {
    this.clear();
    this.countNode.textContent = `(${neighbors.length})`;
    if (!neighbors.length) {
      this.container.append(el('p', {
        className: 'empty', text: 'No slice matched (check the filters).',
      }));
      return;
    }
    this.mapMax = Math.max(0, ...neighbors.flatMap((n) => n.position_distances.flat()));
    this.mapLegend.replaceChildren(
      el('span', { text: 'position maps: 0' }),
      el('span', { className: 'map-bar', 'aria-hidden': 'true' }),
      el('span', { className: 'map-max', text: `${formatDistance(this.mapMax)} per position` }),
    );
    this.mapLegend.dataset.max = String(this.mapMax);
    const template = $('#neighbor-template');
    for (const neighbor of neighbors) {
      const card = template.content.firstElementChild.cloneNode(true);
      this.fill(card, neighbor);
      this.container.append(card);
      this.cards.push({ card, neighbor, overlayRequested: false });
    }
    for (const entry of this.cards) this.loadImage(entry);
    if (document.body.classList.contains('show-overlays')) this.loadAllOverlays();
  }

  fill(card, n) {
    const where = `patient ${n.patient_id}, slice ${n.slice_index}`;
    card.dataset.sliceId = String(n.slice_id);
    card.dataset.rank = String(n.rank);
    card.setAttribute('aria-label', `Neighbour ${n.rank}: ${where}`);
    $('.rank', card).textContent = String(n.rank);
    $('.neighbor-image', card).alt = `Neighbour ${n.rank}: ${where}`;
    $('.label-overlay', card).alt = `Ground-truth labels of ${where}`;
    const distance = $('.distance', card);
    distance.textContent = formatDistance(n.distance);
    distance.title = `squared L2 distance ${n.distance}`;
    const match = $('.match', card);
    match.textContent = formatMatch(n.match_percentile);
    match.title = MATCH_HELP;
    $('.patient', card).textContent = n.patient_id;
    $('.patient', card).title = n.patient_id;
    $('.slice', card).textContent = String(n.slice_index);
    // A DICOM-sourced hit: the UIDs a reader pastes into their viewer to open the study.
    if (n.study_uid || n.series_uid) {
      $('.meta-dicom', card).hidden = false;
      for (const [cls, uid, what] of [['.study-uid', n.study_uid, 'StudyInstanceUID'],
        ['.series-uid', n.series_uid, 'SeriesInstanceUID']]) {
        $(cls, card).textContent = uid || '';
        $(cls, card).title = `${what} ${uid || ''}`;
      }
    }
    const [badgeText, badgeClass] = badgeFor(n.has_abnormality);
    const badge = $('.badge', card);
    badge.textContent = badgeText;
    badge.className = badgeClass;

    const canvas = $('.position-map', card);
    drawPositionMap(canvas, n.position_distances, this.mapMax);
    canvas.setAttribute('role', 'img');
    canvas.setAttribute('aria-label', `Per-position distance map of neighbour ${n.rank}`);
    this.wireReadout(card, n);

    const overlayButton = $('.overlay-button', card);
    if (n.overlay_url) {
      overlayButton.addEventListener('click', () => {
        const on = card.classList.toggle('show-overlay');
        overlayButton.setAttribute('aria-pressed', String(on));
        if (on) this.loadOverlay(this.cards.find((entry) => entry.card === card));
      });
    } else {
      overlayButton.hidden = true;
    }
    $('.similar-button', card).addEventListener('click', () => this.onSimilar(n));
    $('.similar-button', card).title = `Search the index with ${where}`;
  }

  // The hovered code position's share of the distance, for reading the map cell by cell.
  wireReadout(card, n) {
    const thumb = $('.thumb', card);
    const readout = $('.cell-readout', card);
    const rows = n.position_distances.length;
    const cols = rows ? n.position_distances[0].length : 0;
    thumb.addEventListener('mousemove', (event) => {
      if (!rows || !cols) return;
      const box = thumb.getBoundingClientRect();
      const r = Math.min(rows - 1, Math.floor(((event.clientY - box.top) / box.height) * rows));
      const c = Math.min(cols - 1, Math.floor(((event.clientX - box.left) / box.width) * cols));
      if (r < 0 || c < 0) return;
      const value = n.position_distances[r][c];
      const pct = n.distance > 0 ? ` (${((100 * value) / n.distance).toFixed(1)}%)` : '';
      readout.textContent = `position (${r}, ${c}): ${formatDistance(value)}${pct}`;
    });
    thumb.addEventListener('mouseleave', () => { readout.textContent = ''; });
  }

  async loadInto(img, url, entry) {
    const { signal } = this.controller;
    try {
      const objectURL = await fetchObjectURL(url, signal);
      if (signal.aborted) {
        URL.revokeObjectURL(objectURL);
        return;
      }
      this.objectURLs.push(objectURL);
      img.src = objectURL;
      img.hidden = false;
    } catch (err) {
      if (signal.aborted || err?.name === 'AbortError') return;
      const status = $('.thumb-status', entry.card);
      status.textContent = `image failed: ${err.message}`;
      entry.card.classList.add('image-failed');
      if (err instanceof ApiError && err.status === 401) {
        this.onError(failureText('Loading a neighbour image', err), err);
      }
    }
  }

  loadImage(entry) {
    return this.loadInto($('.neighbor-image', entry.card), entry.neighbor.image_url, entry);
  }

  loadOverlay(entry) {
    if (!entry || entry.overlayRequested || !entry.neighbor.overlay_url) return;
    entry.overlayRequested = true;
    this.loadInto($('.label-overlay', entry.card), entry.neighbor.overlay_url, entry);
  }

  loadAllOverlays() {
    for (const entry of this.cards) this.loadOverlay(entry);
  }
}
