// The archive browser: pick a query among the indexed slices (a patient, then a slice on a
// slider with its thumbnail), and the "try an example" button of the empty page.
// It knows nothing of searching: `onPick(slice)` hands the chosen slice to the page.

const THUMB_DEBOUNCE_MS = 120;

export class Archive {
  // request(method, path) -> Response (with the API key); onPick({slice_id, patient_id, ...}).
  constructor(root, { request, onPick }) {
    this.root = root;
    this.request = request;
    this.onPick = onPick;
    this.patients = [];
    this.slices = [];
    this.thumbURL = null;
    this.timer = null;
    this.select = root.querySelector('#archive-patient');
    this.slider = root.querySelector('#archive-slider');
    this.output = root.querySelector('#archive-slice-value');
    this.thumb = root.querySelector('#archive-thumb');
    this.caption = root.querySelector('#archive-caption');
    this.button = root.querySelector('#archive-search');
    this.select.addEventListener('change', () => this.showPatient(this.select.value));
    this.slider.addEventListener('input', () => this.moved());
    this.button.addEventListener('click', () => {
      const chosen = this.current();
      if (chosen) this.onPick(chosen);
    });
  }

  async load() {
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

  // A patient's slices; the slider starts on `sliceId` or on the middle slice.
  async showPatient(patientId, sliceId = null) {
    this.select.value = patientId;
    const path = `/patients/${encodeURIComponent(patientId)}`;
    const info = await (await this.request('GET', path)).json();
    this.patient = info;
    this.slices = info.slices;
    this.slider.min = '0';
    this.slider.max = String(Math.max(0, this.slices.length - 1));
    const at = this.slices.findIndex((s) => s.slice_id === sliceId);
    this.slider.value = String(at >= 0 ? at : Math.floor(this.slices.length / 2));
    await this.showThumb();
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
    if (!s) {
      this.caption.textContent = 'This patient has no indexed slice.';
      this.button.disabled = true;
      return;
    }
    this.button.disabled = false;
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

  // The example: the patient with the most lesion slices, its lesion slice nearest the middle.
  async example() {
    if (!this.patients.length) await this.load();
    const best = [...this.patients].sort((a, b) => b.lesion_slices - a.lesion_slices)[0];
    if (!best) return null;
    await this.showPatient(best.patient_id);
    const middle = Math.floor(this.slices.length / 2);
    const order = this.slices.map((s, i) => [Math.abs(i - middle), i, s])
      .sort((a, b) => a[0] - b[0]);
    const pick = order.find(([, , s]) => s.has_abnormality) ?? order[0];
    if (!pick) return null;
    this.slider.value = String(pick[1]);
    await this.showThumb();
    return this.current();
  }
}
