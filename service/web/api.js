// Requests to the API: every one goes through `request()`, which adds the API key (X-API-Key)
// when one is set and turns any non-2xx answer into an ApiError carrying the server's `detail`.

export const KEY_STORAGE = 'cbir-api-key';

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || '';
}

export function authHeaders() {
  const key = apiKey();
  return key ? { 'X-API-Key': key } : {};
}

// FastAPI's `detail` is a string, or for 422 a list of {loc, msg, ...}.
export function describeDetail(body, fallback) {
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

export async function request(method, path, { body, signal } = {}) {
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

export async function requestJSON(method, path, options) {
  return (await request(method, path, options)).json();
}

export function failureText(label, err) {
  if (err instanceof ApiError) {
    return err.status ? `${label} failed (HTTP ${err.status}): ${err.message}`
      : `${label} failed: ${err.message}`;
  }
  return `${label} failed: ${err?.message ?? err}`;
}

export async function fetchObjectURL(url, signal) {
  const blob = await (await request('GET', url, { signal })).blob();
  return URL.createObjectURL(blob);
}
