// The retrieval page: plain ES modules, no build step, no third-party code. This one holds
// the page's state, search and compose, and wires everything; api.js the requests, grid.js the
// neighbour grid, panels.js the image panels, archive.js the archive browser, dom.js helpers.

import {
  ApiError, KEY_STORAGE, apiKey, failureText, fetchObjectURL, request, requestJSON,
} from './api.js';
import { Archive } from './archive.js';
import { $, $$, el, formatBytes } from './dom.js';
import { NeighborGrid } from './grid.js';
import { figure, lesionFigure, showWarnings } from './panels.js';
const SLIDER_DEBOUNCE_MS = 250;
const SPACE_HELP = {
  normal: 'Same anatomy regardless of lesion: compares the normal codes only.',
  abnormal: 'Similar lesion in any anatomy: compares the abnormal codes only.',
  concat: 'Both: anatomy and lesion together (normal and abnormal codes).',
};
const KIND_LABEL = {
  png: 'PNG', jpeg: 'JPEG', nifti: 'NIfTI volume', dicom: 'DICOM', indexed: 'indexed slice',
};
// Uploads whose orientation the server knows (from the volume's or the file's header): their
// images get R/L and A/P markers; a PNG or JPEG's orientation is unknown.
const ORIENTED_KINDS = new Set(['nifti', 'dicom', 'dicom_series', 'indexed']);
const isOriented = (query) => ORIENTED_KINDS.has(query?.kind);

const state = {
  info: null,
  search: { file: null, slice: null, source: 'upload', similarOf: null },
  compose: { normal: { file: null, slice: null }, abnormal: { file: null, slice: null } },
};

// ---------------------------------------------------------------- requests and errors

function showError(message) {
  $('#error-message').textContent = message;
  $('#error').hidden = false;
}

function clearError() {
  $('#error').hidden = true;
  $('#error-message').textContent = '';
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
  $('#model-note-text').textContent = info.model_note ? `Model: ${info.model_note}` : '';
  $('#model-card-open').hidden = !info.model_card;
  $('#model-note').hidden = !info.model_note && !info.model_card;

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
    archiveReady?.();
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

const queryObjectURLs = [];

function revokeQueryURLs() {
  while (queryObjectURLs.length) URL.revokeObjectURL(queryObjectURLs.pop());
}

// ---------------------------------------------------------------- neighbour grid

const grids = {};
let archiveReady = null; // loads the archive's patient list once the index info is in

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

  const oriented = isOriented(q);
  $('#query-panel').replaceChildren(
    figure(data.image, 'image', 'Query', `Query slice from ${file.name}`,
      { title: 'The slice as the model sees it (preprocessed)', oriented }),
    figure(data.reconstruction, 'reconstruction', 'Reconstruction x̂⁺',
      'Reconstruction from both codes',
      { title: 'Decoded from the normal and abnormal codes', oriented }),
    figure(data.pseudo_normal, 'pseudo_normal', 'Pseudo-normal x̂⁻',
      'Pseudo-normal slice: the query with its lesion removed',
      { title: 'Decoded from the normal code alone: what the normal space searches with',
        oriented }),
    lesionFigure(data.segmentation, 'segmentation', 'Predicted lesion',
      'Predicted lesion segmentation over the query', q.predicted_pixels, { oriented }),
  );
  showWarnings($('#search-warnings'), data.warnings);

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
  params.set('group', $('#group-patient').checked ? 'patient' : 'slice');
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
  $('#file-name').textContent = `Query: indexed slice, ${where}`;
  showWarnings($('#search-warnings'), []);
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
  params.set('group', $('#group-patient').checked ? 'patient' : 'slice');
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

  // The composite has the anatomy donor's orientation.
  const anatomyOriented = isOriented(data.normal_query);
  $('#compose-panel').replaceChildren(
    figure(data.normal_image, 'normal_image', `Anatomy from ${normal.file.name}`,
      `Anatomy source: ${normal.file.name}`, { oriented: anatomyOriented }),
    figure(data.abnormal_image, 'abnormal_image', `Lesion from ${abnormal.file.name}`,
      `Lesion source: ${abnormal.file.name}`, { oriented: isOriented(data.abnormal_query) }),
    figure(data.composite, 'composite', 'Composite',
      'Composite: the first slice\'s anatomy with the second slice\'s lesion',
      { id: 'composite', oriented: anatomyOriented }),
    lesionFigure(data.segmentation, 'segmentation', 'Predicted lesion over the composite',
      'The lesion predicted from the abnormal code, over the composite', data.composite_pixels,
      { oriented: anatomyOriented }),
  );
  showWarnings($('#compose-warnings'), data.warnings);

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
  const exclude = $('#compose-exclude-patient').value.trim();
  if (exclude) params.set('exclude_patient', exclude);
  const hasAbnormality = $('#compose-has-abnormality').value;
  if (hasAbnormality) params.set('has_abnormality', hasAbnormality);
  params.set('group', $('#compose-group-patient').checked ? 'patient' : 'slice');
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

// An indexed slice as an upload: its stored image, a 16-bit PNG that encodes to the codes
// stored for it.
async function archiveFile(slice) {
  const blob = await (await request('GET', slice.image_url)).blob();
  return new File([blob], `${slice.patient_id} slice ${slice.slice_index}.png`,
    { type: 'image/png' });
}

async function composeFromArchive(which, slice) {
  try {
    onComposeFile(which, await archiveFile(slice));
  } catch (err) {
    showError(failureText('The archive slice', err));
  }
}

// The exclude-patient fields name a patient of this archive as their example.
function setExcludePlaceholders(patients) {
  const text = patients.length ? `e.g. ${patients[0].patient_id}` : 'a patient id';
  for (const selector of ['#exclude-patient', '#compose-exclude-patient']) {
    $(selector).placeholder = text;
  }
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
  const gridEvents = {
    onSimilar: (neighbor) => runSimilar(neighbor),
    onError: (text, err) => {
      showError(text);
      if (err instanceof ApiError && err.status === 401) showAuth();
    },
  };
  grids.search = new NeighborGrid($('#neighbors'), $('#search-count'), $('#search-map-legend'),
    gridEvents);
  grids.compose = new NeighborGrid($('#compose-neighbors'), $('#compose-count'),
    $('#compose-map-legend'), gridEvents);
  for (const node of $$('.overlay-legend')) {
    node.append($('#lesion-legend-template').content.cloneNode(true));
  }
  const archive = new Archive($('#archive'), {
    request,
    actions: { search: (slice) => runSimilar(slice) },
  });
  const composeArchive = new Archive($('#compose-archive'), {
    request,
    prefix: 'compose-archive',
    actions: {
      anatomy: (slice) => composeFromArchive('normal', slice),
      lesion: (slice) => composeFromArchive('abnormal', slice),
    },
  });
  archiveReady = async () => {
    try {
      await Promise.all([archive.load(), composeArchive.load()]);
      setExcludePlaceholders(archive.patients);
    } catch (err) {
      showError(failureText('The archive', err));
    }
  };
  $('#compose-example').addEventListener('click', async () => {
    try {
      $('#compose-archive').open = true;
      const lesion = await composeArchive.example(state.info?.example);
      const anatomy = lesion && await composeArchive.anatomyFor(lesion);
      if (!lesion || !anatomy) {
        showError('The example needs two patients in the archive.');
        return;
      }
      state.compose = {
        normal: { file: await archiveFile(anatomy), slice: null },
        abnormal: { file: await archiveFile(lesion), slice: null },
      };
      describeFile($('#compose-normal-name'), state.compose.normal.file);
      describeFile($('#compose-abnormal-name'), state.compose.abnormal.file);
      await runCompose();
    } catch (err) {
      showError(failureText('The example', err));
    }
  });
  $('#try-example').addEventListener('click', async () => {
    try {
      $('#archive').open = true;
      const slice = await archive.example(state.info?.example);
      if (slice) await runSimilar(slice);
    } catch (err) {
      showError(failureText('The example', err));
    }
  });

  // A file dropped beside a drop zone must not make the browser navigate to it.
  window.addEventListener('dragover', (event) => event.preventDefault());
  window.addEventListener('drop', (event) => event.preventDefault());

  $('#error-dismiss').addEventListener('click', clearError);
  $('#model-card-open').addEventListener('click', async () => {
    try {
      const text = await (await request('GET', '/model-card')).text();
      $('#model-card-text').textContent = text;
      $('#model-card').showModal();
    } catch (err) {
      showError(failureText('The model card', err));
    }
  });
  $('#model-card-close').addEventListener('click', () => $('#model-card').close());
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
  $('#group-patient').addEventListener('change', rerunSearchView);
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
