// The retrieval page: plain ES module, no build step, no third-party code.
// Every request goes through `request()`, which adds the API key (X-API-Key) when one is set
// and turns any non-2xx answer into an ApiError carrying the server's `detail`.

const KEY_STORAGE = 'cbir-api-key';
const SLIDER_DEBOUNCE_MS = 250;
const SPACE_HELP = {
  normal: 'Same anatomy regardless of lesion: compares the normal codes only.',
  abnormal: 'Similar lesion in any anatomy: compares the abnormal codes only.',
  concat: 'Both: anatomy and lesion together (normal and abnormal codes).',
};
const KIND_LABEL = {
  png: 'PNG', jpeg: 'JPEG', nifti: 'NIfTI volume', dicom: 'DICOM', indexed: 'indexed slice',
};

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

const state = {
  info: null,
  search: { file: null, slice: null, source: 'upload', similarOf: null },
  compose: { normal: { file: null, slice: null }, abnormal: { file: null, slice: null } },
};

// ---------------------------------------------------------------- requests and errors

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || '';
}

function authHeaders() {
  const key = apiKey();
  return key ? { 'X-API-Key': key } : {};
}

// FastAPI's `detail` is a string, or for 422 a list of {loc, msg, ...}.
function describeDetail(body, fallback) {
  const detail = body?.detail;
  if (typeof detail === 'string' && detail.trim()) return detail;
  if (Array.isArray(detail) && detail.length) {
    return detail.map((item) => {
      if (typeof item !== 'object' || item === null) return String(item);
      const loc = Array.isArray(item.loc) ? item.loc : [];
      const where = (['body', 'query', 'path', 'header'].includes(loc[0]) ? loc.slice(1) : loc)
        .join('.');
      const msg = item.msg ?? JSON.stringify(item);
      return where ? `${where}: ${msg}` : msg;
    }).join('; ');
  }
  if (detail !== undefined && detail !== null) return JSON.stringify(detail);
  return fallback;
}

async function request(method, path, { body, signal } = {}) {
  let response;
  try {
    response = await fetch(path, { method, body, signal, headers: authHeaders() });
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError(0, `could not reach the server (${err.message})`);
  }
  if (!response.ok) {
    const fallback = `${response.status} ${response.statusText}`.trim();
    const text = await response.text().catch(() => '');
    let message;
    try {
      message = describeDetail(JSON.parse(text), fallback);
    } catch {
      message = text.trim() ? text.trim().slice(0, 300) : fallback;
    }
    throw new ApiError(response.status, message);
  }
  return response;
}

async function requestJSON(method, path, options) {
  return (await request(method, path, options)).json();
}

function showError(message) {
  $('#error-message').textContent = message;
  $('#error').hidden = false;
}

function clearError() {
  $('#error').hidden = true;
  $('#error-message').textContent = '';
}

function failureText(label, err) {
  if (err instanceof ApiError) {
    return err.status ? `${label} failed (HTTP ${err.status}): ${err.message}`
      : `${label} failed: ${err.message}`;
  }
  return `${label} failed: ${err?.message ?? err}`;
}

// ---------------------------------------------------------------- busy state

const inflight = { search: null, compose: null };

function refreshBusy() {
  const running = Object.values(inflight).filter(Boolean);
  // Visibility, not display: the header must not shift when a request starts.
  $('#busy').classList.toggle('active', running.length > 0);
  $('#busy-text').textContent = running.length ? `${running[running.length - 1].label}…` : '';
  $('#search-button').disabled = inflight.search !== null;
  $('#compose-button').disabled = inflight.compose !== null;
  $('#search-results').setAttribute('aria-busy', String(inflight.search !== null));
  $('#compose-results').setAttribute('aria-busy', String(inflight.compose !== null));
}

// One request per view at a time: a newer one (a moved slider) aborts the older.
async function run(view, label, task) {
  inflight[view]?.controller.abort();
  const entry = { controller: new AbortController(), label };
  inflight[view] = entry;
  clearError();
  refreshBusy();
  try {
    await task(entry.controller.signal);
  } catch (err) {
    if (!entry.controller.signal.aborted && err?.name !== 'AbortError') {
      showError(failureText(label, err));
      if (err instanceof ApiError && err.status === 401) showAuth();
    }
  } finally {
    if (inflight[view] === entry) inflight[view] = null;
    refreshBusy();
  }
}

// ---------------------------------------------------------------- small helpers

function formatDistance(d) {
  return Number(d).toPrecision(3);
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} kB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function el(tag, props = {}, children = []) {
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

function readK(selector) {
  const input = $(selector);
  const max = state.info?.max_k ?? Number(input.max);
  const k = Number(input.value);
  if (!Number.isInteger(k) || k < 1 || k > max) {
    showError(`k must be a whole number from 1 to ${max}.`);
    input.focus();
    return null;
  }
  return k;
}

function fitsUploadLimit(file) {
  const maxMb = state.info?.max_upload_mb;
  if (maxMb && file.size > maxMb * 1024 * 1024) {
    showError(`${file.name} is ${formatBytes(file.size)}; the server accepts at most ${maxMb} MB.`);
    return false;
  }
  return true;
}

async function fetchObjectURL(url, signal) {
  const blob = await (await request('GET', url, { signal })).blob();
  return URL.createObjectURL(blob);
}

// ---------------------------------------------------------------- index info and API key

function showAuth() {
  document.body.dataset.state = 'auth';
  $('#auth-panel').hidden = false;
  $('#search-fieldset').disabled = true;
  $('#compose-fieldset').disabled = true;
  $('#index-stats').textContent = 'This server needs an API key.';
  $('#api-key').focus();
}

function renderInfo(info) {
  const stats = [
    `${info.patients.toLocaleString()} patients`,
    `${info.slices.toLocaleString()} slices (${info.abnormal_slices.toLocaleString()} with lesion)`,
    `model preset ${info.preset}`,
    `index generation ${info.generation}`,
  ];
  if (info.faiss_gpu) stats.push('FAISS on GPU');
  if (info.auth_required) stats.push('API key in use');
  $('#index-stats').textContent = stats.join(' · ');
  const note = $('#model-note');
  note.textContent = info.model_note ? `Model: ${info.model_note}` : '';
  note.hidden = !info.model_note;

  for (const option of $$('#space option')) {
    option.disabled = !info.spaces.includes(option.value);
  }
  for (const selector of ['#k', '#compose-k']) {
    const input = $(selector);
    input.max = String(info.max_k);
    input.value = String(Math.min(info.default_k, info.max_k));
  }
}

async function loadInfo() {
  try {
    const info = await requestJSON('GET', '/info');
    state.info = info;
    renderInfo(info);
    $('#auth-panel').hidden = true;
    $('#search-fieldset').disabled = false;
    $('#compose-fieldset').disabled = false;
    clearError();
    document.body.dataset.state = 'ready';
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      const hadKey = Boolean(apiKey());
      sessionStorage.removeItem(KEY_STORAGE);
      showAuth();
      if (hadKey) showError(`The server refused this API key: ${err.message}`);
    } else {
      document.body.dataset.state = 'error';
      $('#index-stats').textContent = 'The index is not available.';
      showError(failureText('Loading the index information', err));
    }
  }
}

// ---------------------------------------------------------------- image panels

function figure(src, role, caption, alt, { id, title } = {}) {
  const img = el('img', { src, alt, id, dataset: { role }, decoding: 'async' });
  const figcaption = el('figcaption', { text: caption });
  return el('figure', { className: 'panel-figure', title }, [img, figcaption]);
}

const queryObjectURLs = [];

function revokeQueryURLs() {
  while (queryObjectURLs.length) URL.revokeObjectURL(queryObjectURLs.pop());
}

// ---------------------------------------------------------------- neighbour grid

function drawPositionMap(canvas, map) {
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const rows = map.length;
  const cols = rows ? map[0].length : 0;
  const max = Math.max(0, ...map.flat());
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

class NeighborGrid {
  constructor(container, countNode) {
    this.container = container;
    this.countNode = countNode;
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
    $('.patient', card).textContent = n.patient_id;
    $('.patient', card).title = n.patient_id;
    $('.slice', card).textContent = String(n.slice_index);
    const [badgeText, badgeClass] = badgeFor(n.has_abnormality);
    const badge = $('.badge', card);
    badge.textContent = badgeText;
    badge.className = badgeClass;

    const canvas = $('.position-map', card);
    drawPositionMap(canvas, n.position_distances);
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
    $('.similar-button', card).addEventListener('click', () => runSimilar(n));
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
        showError(failureText('Loading a neighbour image', err));
        showAuth();
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

const grids = {};

// ---------------------------------------------------------------- search

function setSlider(query, slider, control, output) {
  const count = query?.slice_count;
  if (!count || count < 2 || query.slice === null || query.slice === undefined) {
    control.hidden = true;
    return;
  }
  slider.min = '0';
  slider.max = String(count - 1);
  if (!slider.dataset.pending) slider.value = String(query.slice);
  output.value = `${slider.value} / ${count - 1}`;
  control.hidden = false;
}

function renderSearch(data, file) {
  revokeQueryURLs();
  const q = data.query;
  state.search.slice = q.slice ?? null;
  $('#search-title').textContent = `Query: ${file.name}`;

  const info = [el('span', { text: KIND_LABEL[q.kind] ?? q.kind })];
  if (q.slice !== null && q.slice !== undefined) {
    const range = q.slice_count ? ` of 0–${q.slice_count - 1}` : '';
    info.push(' · ', el('span', {
      id: 'query-slice', dataset: { slice: String(q.slice) }, text: `slice ${q.slice}${range}`,
    }));
  }
  info.push(' · ', el('span', {
    text: `predicted lesion ${q.predicted_abnormal_pixels.toLocaleString()} px`,
  }));
  info.push(' · ', el('span', { text: `space ${data.space}, k ${data.k}` }));
  $('#query-info').replaceChildren(...info);

  $('#query-panel').replaceChildren(
    figure(data.image, 'image', 'Query', `Query slice from ${file.name}`,
      { title: 'The slice as the model sees it (preprocessed)' }),
    figure(data.reconstruction, 'reconstruction', 'Reconstruction x̂⁺',
      'Reconstruction from both codes', { title: 'Decoded from the normal and abnormal codes' }),
    figure(data.pseudo_normal, 'pseudo_normal', 'Pseudo-normal x̂⁻',
      'Pseudo-normal slice: the query with its lesion removed',
      { title: 'Decoded from the normal code alone: what the normal space searches with' }),
    figure(data.segmentation, 'segmentation', 'Predicted lesion',
      'Predicted lesion segmentation over the query',
      { title: 'The segmentation decoder\'s lesion classes over the query' }),
  );

  setSlider(q, $('#slice-slider'), $('#slice-control'), $('#slice-value'));
  grids.search.render(data.neighbors);
  $('#search-results').hidden = false;
  $('#search-empty').hidden = true;
}

function searchParams(k) {
  const params = new URLSearchParams({ space: $('#space').value, k: String(k) });
  if (state.search.slice !== null) params.set('slice', String(state.search.slice));
  const exclude = $('#exclude-patient').value.trim();
  if (exclude) params.set('exclude_patient', exclude);
  const hasAbnormality = $('#has-abnormality').value;
  if (hasAbnormality) params.set('has_abnormality', hasAbnormality);
  return params;
}

async function runSearch() {
  const { file } = state.search;
  if (!file) {
    showError('Choose or drop a file to search with.');
    return;
  }
  const k = readK('#k');
  if (k === null || !fitsUploadLimit(file)) return;
  const params = searchParams(k);
  await run('search', 'Search', async (signal) => {
    const body = new FormData();
    body.append('file', file, file.name);
    const data = await requestJSON('POST', `/search?${params}`, { body, signal });
    if (signal.aborted) return;
    state.search.source = 'upload';
    renderSearch(data, file);
  });
}

function renderSimilar(data, of) {
  revokeQueryURLs();
  const where = `patient ${of.patient_id}, slice ${of.slice_index}`;
  $('#search-title').textContent = `More like ${where} (other patients)`;
  $('#query-info').replaceChildren(
    el('span', { text: `indexed slice ${data.slice_id}` }), ' · ',
    el('span', { text: `space ${data.space}, k ${data.k}` }),
  );
  const image = figure('', 'image', 'Indexed slice', `Indexed slice: ${where}`);
  const figures = [image];
  let overlay = null;
  if (of.overlay_url) {
    overlay = figure('', 'overlay', 'Ground-truth labels', `Ground-truth labels of ${where}`);
    figures.push(overlay);
  }
  $('#query-panel').replaceChildren(...figures);
  for (const [fig, url] of [[image, of.image_url], [overlay, of.overlay_url]]) {
    if (!fig) continue;
    fetchObjectURL(url).then((objectURL) => {
      queryObjectURLs.push(objectURL);
      $('img', fig).src = objectURL;
    }).catch((err) => showError(failureText('Loading the query image', err)));
  }
  $('#slice-control').hidden = true;
  grids.search.render(data.neighbors);
  $('#search-results').hidden = false;
  $('#search-empty').hidden = true;
}

async function runSimilar(neighbor) {
  setMode('search');
  const k = readK('#k');
  if (k === null) return;
  // The slice's own patient is left out (the server's default); the lesion filter applies.
  const params = new URLSearchParams({ space: $('#space').value, k: String(k) });
  const hasAbnormality = $('#has-abnormality').value;
  if (hasAbnormality) params.set('has_abnormality', hasAbnormality);
  await run('search', 'More like this', async (signal) => {
    const data = await requestJSON('POST', `/slices/${neighbor.slice_id}/similar?${params}`,
      { signal });
    if (signal.aborted) return;
    state.search.source = 'similar';
    state.search.similarOf = neighbor;
    renderSimilar(data, neighbor);
  });
}

function rerunSearchView() {
  if (state.search.source === 'similar' && state.search.similarOf) {
    return runSimilar(state.search.similarOf);
  }
  if (state.search.file) return runSearch();
  return undefined;
}

function describeFile(node, file) {
  node.textContent = file ? `${file.name} · ${formatBytes(file.size)}` : '';
}

function onSearchFile(file) {
  state.search.file = file;
  state.search.slice = null;
  state.search.source = 'upload';
  describeFile($('#file-name'), file);
  $('#slice-control').hidden = true;
  $('#search-results').hidden = true;
  $('#search-empty').hidden = false;
  grids.search.clear();
  revokeQueryURLs();
  runSearch();
}

// ---------------------------------------------------------------- compose

function renderCompose(data) {
  const { normal, abnormal } = state.compose;
  normal.slice = data.normal_query.slice ?? null;
  abnormal.slice = data.abnormal_query.slice ?? null;

  const describe = (label, q, id) => {
    const parts = [el('span', { text: `${label}: ${KIND_LABEL[q.kind] ?? q.kind}` })];
    if (q.slice !== null && q.slice !== undefined) {
      const slice = String(q.slice);
      parts.push(' ', el('span', { id, dataset: { slice }, text: `slice ${slice}` }));
    }
    return parts;
  };
  $('#compose-info').replaceChildren(
    ...describe('anatomy', data.normal_query, 'compose-normal-slice'), ' · ',
    ...describe('lesion', data.abnormal_query, 'compose-abnormal-slice'), ' · ',
    el('span', { text: `space ${data.space}, k ${data.k}` }),
  );

  $('#compose-panel').replaceChildren(
    figure(data.normal_image, 'normal_image', `Anatomy from ${normal.file.name}`,
      `Anatomy source: ${normal.file.name}`),
    figure(data.abnormal_image, 'abnormal_image', `Lesion from ${abnormal.file.name}`,
      `Lesion source: ${abnormal.file.name}`),
    figure(data.composite, 'composite', 'Composite',
      'Composite: the first slice\'s anatomy with the second slice\'s lesion', { id: 'composite' }),
    figure(data.segmentation, 'segmentation', 'Lesion over composite',
      'The lesion of the abnormal code over the composite'),
  );

  setSlider(data.normal_query, $('#compose-normal-slider'),
    $('#compose-normal-slice-control'), $('#compose-normal-slice-value'));
  setSlider(data.abnormal_query, $('#compose-abnormal-slider'),
    $('#compose-abnormal-slice-control'), $('#compose-abnormal-slice-value'));
  grids.compose.render(data.neighbors);
  $('#compose-results').hidden = false;
  $('#compose-empty').hidden = true;
}

async function runCompose() {
  const { normal, abnormal } = state.compose;
  if (!normal.file || !abnormal.file) {
    showError('Choose both files: one for the normal anatomy and one for the lesion.');
    return;
  }
  const k = readK('#compose-k');
  if (k === null || !fitsUploadLimit(normal.file) || !fitsUploadLimit(abnormal.file)) return;
  const params = new URLSearchParams({ k: String(k) });
  if (normal.slice !== null) params.set('normal_slice', String(normal.slice));
  if (abnormal.slice !== null) params.set('abnormal_slice', String(abnormal.slice));
  await run('compose', 'Compose', async (signal) => {
    const body = new FormData();
    body.append('normal', normal.file, normal.file.name);
    body.append('abnormal', abnormal.file, abnormal.file.name);
    const data = await requestJSON('POST', `/compose?${params}`, { body, signal });
    if (signal.aborted) return;
    renderCompose(data);
  });
}

function onComposeFile(which, file) {
  state.compose[which] = { file, slice: null };
  describeFile($(`#compose-${which}-name`), file);
  $(`#compose-${which}-slice-control`).hidden = true;
  if (state.compose.normal.file && state.compose.abnormal.file) runCompose();
}

function swapCompose() {
  const { normal, abnormal } = state.compose;
  state.compose = { normal: abnormal, abnormal: normal };
  describeFile($('#compose-normal-name'), state.compose.normal.file);
  describeFile($('#compose-abnormal-name'), state.compose.abnormal.file);
  $('#compose-normal-slice-control').hidden = true;
  $('#compose-abnormal-slice-control').hidden = true;
  if (state.compose.normal.file && state.compose.abnormal.file) runCompose();
}

// ---------------------------------------------------------------- wiring

function wireDropZone(zone, input, onFile) {
  const enabled = () => !input.matches(':disabled');
  zone.addEventListener('dragover', (event) => {
    event.preventDefault();
    if (!enabled()) return;
    event.dataTransfer.dropEffect = 'copy';
    zone.classList.add('dragging');
  });
  zone.addEventListener('dragleave', (event) => {
    if (!zone.contains(event.relatedTarget)) zone.classList.remove('dragging');
  });
  zone.addEventListener('drop', (event) => {
    event.preventDefault();
    zone.classList.remove('dragging');
    const file = event.dataTransfer.files[0];
    if (file && enabled()) onFile(file);
  });
  input.addEventListener('change', () => {
    const file = input.files[0];
    // Clear the input so that choosing the same file again re-runs; the File stays in `state`.
    input.value = '';
    if (file) onFile(file);
  });
}

// A slider re-sends its request 250 ms after the last move, or at once when released.
function wireSlider(slider, output, commit) {
  let timer = null;
  const fire = () => {
    clearTimeout(timer);
    timer = null;
    delete slider.dataset.pending;
    commit(Number(slider.value));
  };
  slider.addEventListener('input', () => {
    output.value = `${slider.value} / ${slider.max}`;
    slider.dataset.pending = '1';
    clearTimeout(timer);
    timer = setTimeout(fire, SLIDER_DEBOUNCE_MS);
  });
  slider.addEventListener('change', fire);
}

function setMode(mode) {
  for (const [name, tab] of [['search', $('#mode-search')], ['compose', $('#mode-compose')]]) {
    const selected = name === mode;
    tab.setAttribute('aria-selected', String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(`#${name}-view`).hidden = !selected;
  }
  document.body.dataset.mode = mode;
}

function wireToggles(selector, bodyClass, onEnable) {
  for (const box of $$(selector)) {
    box.addEventListener('change', () => {
      for (const other of $$(selector)) other.checked = box.checked;
      document.body.classList.toggle(bodyClass, box.checked);
      if (box.checked && onEnable) onEnable();
    });
  }
}

function init() {
  grids.search = new NeighborGrid($('#neighbors'), $('#search-count'));
  grids.compose = new NeighborGrid($('#compose-neighbors'), $('#compose-count'));

  // A file dropped beside a drop zone must not make the browser navigate to it.
  window.addEventListener('dragover', (event) => event.preventDefault());
  window.addEventListener('drop', (event) => event.preventDefault());

  $('#error-dismiss').addEventListener('click', clearError);
  $('#auth-panel').addEventListener('submit', (event) => {
    event.preventDefault();
    const key = $('#api-key').value.trim();
    if (!key) {
      showError('Enter the API key.');
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    $('#api-key').value = '';
    loadInfo();
  });

  $('#mode-search').addEventListener('click', () => setMode('search'));
  $('#mode-compose').addEventListener('click', () => setMode('compose'));
  $('.tabs').addEventListener('keydown', (event) => {
    if (event.key !== 'ArrowLeft' && event.key !== 'ArrowRight') return;
    const next = document.body.dataset.mode === 'search' ? 'compose' : 'search';
    setMode(next);
    $(`#mode-${next}`).focus();
  });

  wireDropZone($('#drop-zone'), $('#file-input'), onSearchFile);
  wireDropZone($('#compose-normal-drop'), $('#compose-normal-input'),
    (file) => onComposeFile('normal', file));
  wireDropZone($('#compose-abnormal-drop'), $('#compose-abnormal-input'),
    (file) => onComposeFile('abnormal', file));

  const updateSpaceHelp = () => { $('#space-help').textContent = SPACE_HELP[$('#space').value]; };
  updateSpaceHelp();
  $('#space').addEventListener('change', () => {
    updateSpaceHelp();
    rerunSearchView();
  });
  $('#has-abnormality').addEventListener('change', rerunSearchView);
  $('#search-form').addEventListener('submit', (event) => {
    event.preventDefault();
    state.search.source = 'upload';
    runSearch();
  });
  $('#compose-form').addEventListener('submit', (event) => {
    event.preventDefault();
    runCompose();
  });
  $('#compose-swap').addEventListener('click', swapCompose);

  wireSlider($('#slice-slider'), $('#slice-value'), (slice) => {
    // A pending move of a volume since replaced by another file is dropped.
    if ($('#slice-control').hidden || slice === state.search.slice || !state.search.file) return;
    state.search.slice = slice;
    runSearch();
  });
  for (const which of ['normal', 'abnormal']) {
    wireSlider($(`#compose-${which}-slider`), $(`#compose-${which}-slice-value`), (slice) => {
      const side = state.compose[which];
      if ($(`#compose-${which}-slice-control`).hidden || slice === side.slice || !side.file) return;
      side.slice = slice;
      runCompose();
    });
  }

  wireToggles('.toggle-maps', 'show-maps');
  wireToggles('.toggle-overlays', 'show-overlays', () => {
    grids.search.loadAllOverlays();
    grids.compose.loadAllOverlays();
  });

  setMode('search');
  loadInfo();
}

init();
