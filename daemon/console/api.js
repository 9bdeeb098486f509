// The console's one way to the daemon: fetch with the session's API key as a bearer token,
// OpenAI-style errors turned into ApiError, and Server-Sent Events read from a fetch body
// (EventSource cannot send an Authorization header).

const KEY = 'itamae.apiKey';

export function getKey() { return sessionStorage.getItem(KEY) || ''; }
export function setKey(k) { if (k) sessionStorage.setItem(KEY, k); else sessionStorage.removeItem(KEY); }

export class ApiError extends Error {
  constructor(status, body) {
    const e = body && body.error;
    super(e && e.message ? e.message : `HTTP ${status}`);
    this.status = status;
    this.param = e ? e.param : null;
    this.code = e ? e.code : null;
  }
}

// Listeners told when a call is refused for want of a valid key (401).
const onUnauthorized = [];
export function whenUnauthorized(f) { onUnauthorized.push(f); }

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const k = getKey();
  if (k) h.Authorization = 'Bearer ' + k;
  return h;
}

async function failure(res) {
  const text = await res.text();
  let body = null;
  try { body = JSON.parse(text); } catch { body = null; }
  if (res.status === 401) onUnauthorized.forEach((f) => f());
  return new ApiError(res.status, body);
}

// `api('POST', '/v1/x', {json})` or with a FormData body; resolves to the JSON answer.
export async function api(method, path, body, signal) {
  const init = { method, headers: headers(), signal };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers['Content-Type'] = 'application/json';
  }
  const res = await fetch(path, init);
  if (!res.ok) throw await failure(res);
  const ctype = res.headers.get('content-type') || '';
  return ctype.startsWith('application/json') ? res.json() : res.text();
}

// Yields each `data:` event of a Server-Sent Events answer as parsed JSON, until `[DONE]`.
export async function* sse(method, path, body, signal) {
  const init = { method, headers: headers({ Accept: 'text/event-stream' }), signal };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers['Content-Type'] = 'application/json';
  }
  const res = await fetch(path, init);
  if (!res.ok) throw await failure(res);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const line of block.split('\n')) {
        if (!line.startsWith('data: ')) continue;
        const data = line.slice(6);
        if (data === '[DONE]') return;
        yield JSON.parse(data);
      }
    }
  }
}

// A tiny element builder: h('button', {type: 'button', onclick}, 'Text', child, ...).
export function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

export function fmtTime(unix) {
  return unix ? new Date(unix * 1000).toLocaleString() : '';
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return '';
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function fmtNum(x, digits = 4) {
  return typeof x === 'number' && Number.isFinite(x) ? x.toFixed(digits) : '–';
}
