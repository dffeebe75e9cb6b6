// The archive browser: pick a query among the indexed slices (a patient, then a slice on a
// slider with its thumbnail), and the examples of the empty pages. The page holds two, one per
// mode; their elements' ids start with `prefix`. It knows nothing of searching: each of
// `actions` (a button id suffix -> callback) hands the chosen slice to the page.

const THUMB_DEBOUNCE_MS = 120;

export class Archive {
  // request(method, path) -> Response (with the API key); actions: {search: (slice) => ...}
  // for the button `#${prefix}-search`, a slice being {slice_id, patient_id, ...}.
  constructor(root, { request, actions, prefix = 'archive' }) {
    this.root = root;
    this.request = request;
    this.patients = [];
    this.slices = [];
    this.thumbURL = null;
    this.timer = null;
    this.loading = null; // the patient list's one request, shared by every caller
    this.shown = 0; // which showPatient call is the latest: only its answer is shown
    const part = (name) => root.querySelector(`#${prefix}-${name}`);
    this.select = part('patient');
    this.slider = part('slider');
    this.output = part('slice-value');
    this.thumb = part('thumb');
    this.caption = part('caption');
    this.buttons = Object.entries(actions).map(([name, action]) => {
      const button = part(name);
      button.addEventListener('click', () => {
        const chosen = this.current();
        if (chosen) action(chosen);
      });
      return button;
    });
    this.select.addEventListener('change', () => this.showPatient(this.select.value));
    this.slider.addEventListener('input', () => this.moved());
  }

  // The patient list, fetched once (again only after a failure) and shown with its first
  // patient. The examples wait for it, so that its first patient never replaces theirs.
  load() {
    this.loading ??= this.fill().catch((err) => {
      this.loading = null;
      throw err;
    });
    return this.loading;
  }

  async fill() {
    this.patients = await (await this.request('GET', '/patients')).json();
    this.select.replaceChildren(...this.patients.map((p) => {
      const lesion = p.has_labels ? `, ${p.lesion_slices} with lesion` : '';
      const option = document.createElement('option');
      option.value = p.patient_id;
      option.textContent = `${p.patient_id} (${p.slice_count} slices${lesion})`;
      return option;
    }));
    if (this.patients.length) await this.showPatient(this.patients[0].patient_id);
  }

  // A patient's slices; the slider starts on `sliceId` or on the middle slice. A call
  // overtaken by a later one (another patient chosen meanwhile) shows nothing and answers false.
  async showPatient(patientId, sliceId = null) {
    const call = ++this.shown;
    this.select.value = patientId;
    const path = `/patients/${encodeURIComponent(patientId)}`;
    const info = await (await this.request('GET', path)).json();
    if (call !== this.shown) return false;
    this.patient = info;
    this.slices = info.slices;
    this.slider.min = '0';
    this.slider.max = String(Math.max(0, this.slices.length - 1));
    const at = this.slices.findIndex((s) => s.slice_id === sliceId);
    this.slider.value = String(at >= 0 ? at : Math.floor(this.slices.length / 2));
    await this.showThumb();
    return true;
  }

  current() {
    const s = this.slices[Number(this.slider.value)];
    if (!s || !this.patient) return null;
    const overlay = this.patient.has_labels ? `/slices/${s.slice_id}/overlay.png` : null;
    return {
      slice_id: s.slice_id, patient_id: this.patient.patient_id, slice_index: s.slice_index,
      has_abnormality: s.has_abnormality, image_url: `/slices/${s.slice_id}/image.png`,
      overlay_url: overlay,
    };
  }

  moved() {
    const s = this.current();
    if (s) this.output.value = `${s.slice_index}`;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.showThumb(), THUMB_DEBOUNCE_MS);
  }

  async showThumb() {
    const s = this.current();
    for (const button of this.buttons) button.disabled = !s;
    if (!s) {
      this.caption.textContent = 'This patient has no indexed slice.';
      return;
    }
    this.output.value = `${s.slice_index}`;
    const lesion = s.has_abnormality === true ? ' · lesion' : '';
    this.caption.textContent = `${s.patient_id}, slice ${s.slice_index}${lesion}`;
    this.thumb.dataset.sliceId = String(s.slice_id);
    const blob = await (await this.request('GET', s.image_url)).blob();
    if (this.current()?.slice_id !== s.slice_id) return; // moved on meanwhile
    if (this.thumbURL) URL.revokeObjectURL(this.thumbURL);
    this.thumbURL = URL.createObjectURL(blob);
    this.thumb.src = this.thumbURL;
  }

  // The example: the slice the server names (`named`, /info's `example`: the lesion slice whose
  // first results in the abnormal space are this index's best matches); without one, the
  // patient with the most lesion slices, its lesion slice nearest the middle.
  async example(named = null) {
    await this.load();
    if (named && this.patients.some((p) => p.patient_id === named.patient_id)) {
      if (!(await this.showPatient(named.patient_id, named.slice_id))) return null;
      if (this.current()?.slice_id === named.slice_id) return this.current();
    }
    const best = [...this.patients].sort((a, b) => b.lesion_slices - a.lesion_slices)[0];
    if (!best) return null;
    if (!(await this.showPatient(best.patient_id))) return null;
    const middle = Math.floor(this.slices.length / 2);
    const order = this.slices.map((s, i) => [Math.abs(i - middle), i, s])
      .sort((a, b) => a[0] - b[0]);
    const pick = order.find(([, , s]) => s.has_abnormality) ?? order[0];
    if (!pick) return null;
    this.slider.value = String(pick[1]);
    await this.showThumb();
    return this.current();
  }

  // A lesion-free slice of another patient than `slice`'s, at the level nearest to it: the
  // anatomy donor of the compose example (the patient with the fewest lesion slices).
  async anatomyFor(slice) {
    await this.load();
    const others = this.patients.filter((p) => p.patient_id !== slice.patient_id);
    const donor = [...others].sort((a, b) => a.lesion_slices - b.lesion_slices)[0];
    if (!donor) return null;
    if (!(await this.showPatient(donor.patient_id))) return null;
    const order = this.slices.map((s, i) => [Math.abs(s.slice_index - slice.slice_index), i, s])
      .sort((a, b) => a[0] - b[0]);
    const pick = order.find(([, , s]) => s.has_abnormality === false) ?? order[0];
    if (!pick) return null;
    this.slider.value = String(pick[1]);
    await this.showThumb();
    return this.current();
  }
}
