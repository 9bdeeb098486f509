// The Adapters page (/v1/adapters): every stored or served variant — imported PEFT adapters,
// fine-tuning results and their checkpoints — with residency, generation and size, and the
// load, unload and delete actions the API offers. The list answers imported adapters and the
// variants being served; a job's variant that was unloaded is found through the jobs API, so it
// stays on the page (evicted) and can be loaded again.
import { api, h, fmtBytes, fmtTime } from './api.js';

// The results and checkpoints of succeeded jobs, as evicted adapter rows.
async function jobVariants(signal) {
  let jobs;
  try {
    jobs = await api('GET', '/v1/fine_tuning/jobs?limit=100', undefined, signal);
  } catch (e) {
    if (e.status === 503) return []; // no fine-tuning on this server
    throw e;
  }
  const out = [];
  for (const j of jobs.data.filter((j) => j.status === 'succeeded' && j.fine_tuned_model)) {
    const ad = (j.method && j.method.supervised && j.method.supervised.adapter) || {};
    const row = (id) => ({ id, type: ad.type, resident: false, source: 'fine_tuning_job', fine_tuning_job_id: j.id });
    out.push(row(j.fine_tuned_model));
    const ck = await api('GET', `/v1/fine_tuning/jobs/${j.id}/checkpoints?limit=100`, undefined, signal);
    for (const c of ck.data) out.push(row(c.fine_tuned_model_checkpoint));
  }
  return out;
}

export async function adaptersPage(ctx) {
  const tbody = h('tbody', { id: 'adapters-body' });
  const status = h('p', { id: 'adapters-status', role: 'status' });
  const refresh = async () => {
    const list = await api('GET', '/v1/adapters', undefined, ctx.signal);
    const known = new Set(list.data.map((a) => a.id));
    for (const a of await jobVariants(ctx.signal)) {
      if (!known.has(a.id)) list.data.push(a);
    }
    const act = (a, verb, cls) => h('button', { type: 'button', class: cls, 'data-action': verb, 'aria-label': `${verb} ${a.id}`, onclick: async () => {
      if (verb === 'delete' && !confirm(`Delete ${a.id}? Its files are removed.`)) return;
      try {
        if (verb === 'delete') await api('DELETE', `/v1/adapters/${encodeURIComponent(a.id)}`);
        else await api('POST', `/v1/adapters/${encodeURIComponent(a.id)}/${verb}`, {});
        status.textContent = `${a.id}: ${verb} done.`;
      } catch (e) {
        status.textContent = `${a.id}: ${e.message}`;
      }
      refresh();
    } }, verb[0].toUpperCase() + verb.slice(1));
    tbody.replaceChildren(...(list.data.length ? list.data.map((a) => h('tr', { 'data-adapter': a.id },
      h('td', { class: 'mono' }, a.id),
      h('td', {}, a.type || ''),
      h('td', {}, a.resident ? 'resident' : 'evicted'),
      h('td', { class: 'num' }, a.generation ?? ''),
      h('td', { class: 'num' }, fmtBytes(a.size_bytes)),
      h('td', {}, a.source || ''),
      h('td', {}, fmtTime(a.created_at)),
      h('td', {}, h('div', { class: 'actions' },
        a.resident ? act(a, 'unload', 'secondary') : act(a, 'load', 'secondary'),
        a.source === 'import' ? act(a, 'delete', 'danger') : null))))
      : [h('tr', {}, h('td', { colspan: 8, class: 'muted' }, 'No adapters yet.'))]));
  };
  ctx.root.append(h('h1', {}, 'Adapters'),
    h('p', { class: 'muted' }, 'Imported adapters can be deleted; a fine-tuning job’s results and checkpoints can only be unloaded. An unloaded variant is loaded again by its next request.'),
    status,
    h('section', { class: 'card' }, h('table', {},
      h('caption', { class: 'muted' }, 'Adapters and their residency'),
      h('thead', {}, h('tr', {}, ['Id', 'Type', 'State', 'Generation', 'Size', 'Source', 'Created', 'Actions'].map((t) => h('th', { scope: 'col' }, t)))),
      tbody)));
  await refresh();
}
