// The console's shell: works out what the session may do (no keys configured, an admin key or
// an inference key), asks for a key when one is needed, and routes `#/page/...` to the page
// modules. A page gets an AbortSignal that fires when the user leaves it, which stops its
// streams and polling.
import { api, getKey, setKey, whenUnauthorized } from './api.js';
import { jobsPage } from './jobs.js';
import { jobPage } from './job.js';
import { comparePage } from './compare.js';
import { adaptersPage } from './adapters.js';
import { servingPage } from './serving.js';

const state = { scope: null };
let leave = null;

const $ = (id) => document.getElementById(id);

// 'open' (no keys configured), 'admin', 'inference' or 'locked' (a key is needed).
async function detectScope() {
  try {
    await api('GET', '/v1/models');
  } catch (e) {
    if (e.status === 401) return 'locked';
    throw e;
  }
  try {
    await api('GET', '/v1/fine_tuning/jobs?limit=1');
  } catch (e) {
    if (e.status === 403) return 'inference';
    // 503: this server runs without fine-tuning; the key is still an admin one.
    if (e.status !== 503) throw e;
  }
  return getKey() ? 'admin' : 'open';
}

function showKeyPanel(message) {
  $('key-panel').hidden = false;
  $('page').hidden = true;
  $('key-error').textContent = message || '';
  $('nav').hidden = true;
  $('access').textContent = '';
  $('key-input').focus();
}

function applyScope() {
  $('key-panel').hidden = true;
  $('page').hidden = false;
  $('nav').hidden = false;
  for (const li of $('nav').querySelectorAll('li')) {
    li.hidden = state.scope === 'inference' && li.dataset.scope === 'admin';
  }
  $('access').textContent = {
    open: 'no API keys configured',
    admin: 'admin key',
    inference: 'inference key: Compare only',
  }[state.scope];
  $('forget-key').hidden = !getKey();
}

function route() {
  if (leave) leave.abort();
  leave = new AbortController();
  if (state.scope === 'locked' || state.scope === null) return;
  const hash = location.hash.replace(/^#\/?/, '') || 'jobs';
  const [path, query] = hash.split('?');
  const parts = path.split('/').map(decodeURIComponent);
  const params = new URLSearchParams(query || '');
  let page = parts[0];
  if (state.scope === 'inference' && page !== 'compare') {
    page = 'compare';
    if (location.hash !== '#/compare') history.replaceState(null, '', '#/compare');
  }
  for (const a of $('nav').querySelectorAll('a')) {
    if (a.getAttribute('href') === `#/${page}`) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const root = $('page');
  root.replaceChildren();
  const ctx = { root, signal: leave.signal, params, scope: state.scope };
  const pages = {
    jobs: () => (parts[1] ? jobPage(ctx, parts[1]) : jobsPage(ctx)),
    compare: () => comparePage(ctx),
    adapters: () => adaptersPage(ctx),
    serving: () => servingPage(ctx),
  };
  const render = pages[page];
  if (!render) {
    root.textContent = `No page “${page}”.`;
    return;
  }
  document.title = `itamae · ${page}`;
  Promise.resolve(render()).catch((e) => {
    if (e.name === 'AbortError') return;
    root.append(Object.assign(document.createElement('p'), { className: 'error', role: 'alert', textContent: e.message }));
  });
}

async function start() {
  try {
    state.scope = await detectScope();
  } catch (e) {
    $('page').textContent = `Cannot reach the daemon: ${e.message}`;
    return;
  }
  if (state.scope === 'locked') {
    showKeyPanel(getKey() ? 'That key was refused.' : '');
    return;
  }
  applyScope();
  route();
  $('main').focus();
}

$('key-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  setKey($('key-input').value.trim());
  $('key-input').value = '';
  start();
});
$('forget-key').addEventListener('click', () => {
  setKey('');
  state.scope = null;
  start();
});
whenUnauthorized(() => {
  state.scope = 'locked';
  if (leave) leave.abort();
  showKeyPanel(getKey() ? 'That key was refused.' : '');
});
window.addEventListener('hashchange', () => { route(); $('main').focus(); });
start();
