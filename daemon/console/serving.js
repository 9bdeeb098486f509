// The Serving page: per variant, requests per second and tokens per second over the last
// polling interval, and time-to-first-token and inter-token-latency percentiles, all computed
// in the browser from the daemon's own GET /metrics (Prometheus text).
import { api, h } from './api.js';
import { parseProm, quantile, bucketsBy, sumBy, bucketDelta } from './prom.js';

const POLL_MS = 2000;
const QS = [0.5, 0.9, 0.99];

function ms(v) {
  return v === null || v === undefined ? '–' : `${(v * 1000).toFixed(v < 0.01 ? 1 : 0)} ms`;
}

function snapshot(text) {
  const s = parseProm(text);
  const gauge = (name) => { const x = s.find((m) => m.name === name); return x ? x.value : 0; };
  return {
    at: performance.now(),
    requests: sumBy(s, 'itamae_requests_total', 'model'),
    tokens: sumBy(s, 'itamae_generation_tokens_total', 'model'),
    ttft: bucketsBy(s, 'itamae_time_to_first_token_seconds', 'model'),
    itl: bucketsBy(s, 'itamae_inter_token_latency_seconds', 'model'),
    running: gauge('itamae_num_requests_running'),
    waiting: gauge('itamae_num_requests_waiting'),
    resident: gauge('itamae_adapters_resident'),
  };
}

export async function servingPage(ctx) {
  const tbody = h('tbody', { id: 'serving-body' });
  const summary = h('p', { id: 'serving-summary', role: 'status' });
  const scope = h('select', { id: 's-window' },
    h('option', { value: 'all' }, 'since the daemon started'),
    h('option', { value: 'interval' }, 'last interval only'));
  ctx.root.append(h('h1', {}, 'Serving'),
    h('p', { class: 'muted' }, `From GET /metrics every ${POLL_MS / 1000} s. Rates cover the last interval.`),
    h('div', { class: 'field narrow' }, h('label', { for: 's-window' }, 'Latency percentiles over'), scope),
    summary,
    h('section', { class: 'card' }, h('table', {},
      h('thead', {}, h('tr', {},
        h('th', { scope: 'col' }, 'Model'),
        h('th', { scope: 'col', class: 'num' }, 'Requests'),
        h('th', { scope: 'col', class: 'num' }, 'Requests/s'),
        h('th', { scope: 'col', class: 'num' }, 'Tokens/s'),
        QS.map((q) => h('th', { scope: 'col', class: 'num' }, `TTFT p${q * 100}`)),
        QS.map((q) => h('th', { scope: 'col', class: 'num' }, `ITL p${q * 100}`)))),
      tbody)));
  let prev = null;
  const poll = async () => {
    const now = snapshot(await api('GET', '/metrics', undefined, ctx.signal));
    const dt = prev ? (now.at - prev.at) / 1000 : null;
    const models = Object.keys(now.requests).sort();
    const windowed = scope.value === 'interval' && prev;
    tbody.replaceChildren(...(models.length ? models.map((m) => {
      const rate = (k) => (dt ? Math.max(0, (now[k][m] || 0) - ((prev[k] || {})[m] || 0)) / dt : null);
      const ttft = windowed ? bucketDelta(now.ttft[m] || [], prev.ttft[m]) : now.ttft[m] || [];
      const itl = windowed ? bucketDelta(now.itl[m] || [], prev.itl[m]) : now.itl[m] || [];
      const r = rate('requests'), t = rate('tokens');
      return h('tr', { 'data-model': m },
        h('td', { class: 'mono' }, m),
        h('td', { class: 'num' }, now.requests[m]),
        h('td', { class: 'num' }, r === null ? '…' : r.toFixed(2)),
        h('td', { class: 'num' }, t === null ? '…' : t.toFixed(1)),
        QS.map((q) => h('td', { class: 'num' }, ms(quantile(ttft, q)))),
        QS.map((q) => h('td', { class: 'num' }, ms(quantile(itl, q)))));
    }) : [h('tr', {}, h('td', { colspan: 9, class: 'muted' }, 'No request served yet.'))]));
    summary.textContent = `${now.running} running, ${now.waiting} waiting, ${now.resident} adapters resident.`;
    prev = now;
  };
  await poll();
  const timer = setInterval(() => poll().catch(() => {}), POLL_MS);
  ctx.signal.addEventListener('abort', () => clearInterval(timer));
}
