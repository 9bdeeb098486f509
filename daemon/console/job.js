// The Job page: status and controls, train and validation loss and token-accuracy curves fed
// live by the job's Server-Sent Events stream, the event log, and the checkpoints with their
// metrics and a button to chat with each one on the Compare page.
import { api, sse, h, fmtTime, fmtNum } from './api.js';
import { drawChart, chartSvg } from './chart.js';
import { statusBadge } from './jobs.js';

const DONE = ['succeeded', 'failed', 'cancelled'];

function compareLink(base, model) {
  return `#/compare?models=${encodeURIComponent([base, model].join(','))}`;
}

function chatButton(base, model, label) {
  return h('button', { type: 'button', class: 'secondary', 'data-chat': model, onclick: () => { location.hash = compareLink(base, model); } }, label);
}

export async function jobPage(ctx, id) {
  const { signal } = ctx;
  const head = h('div', { id: 'job-head' });
  const progress = h('p', { id: 'job-progress', role: 'status' }, 'Waiting for the first step…');
  const lossSvg = chartSvg('loss-chart', 'Loss');
  const accSvg = chartSvg('acc-chart', 'Token accuracy');
  const log = h('ol', { id: 'job-events', class: 'muted', reversed: true });
  const ckBody = h('tbody', { id: 'ckpt-body' });
  ctx.root.append(
    h('p', {}, h('a', { href: '#/jobs' }, '← All jobs')),
    head,
    h('div', { class: 'grid2' },
      h('section', { class: 'card chart', 'aria-labelledby': 'loss-title' }, h('h2', { id: 'loss-title' }, 'Loss'), lossSvg),
      h('section', { class: 'card chart', 'aria-labelledby': 'acc-title' }, h('h2', { id: 'acc-title' }, 'Mean token accuracy'), accSvg)),
    progress,
    h('section', { class: 'card', 'aria-labelledby': 'ck-title' }, h('h2', { id: 'ck-title' }, 'Checkpoints'),
      h('table', {}, h('thead', {}, h('tr', {}, ['Step', 'Train loss', 'Valid loss', 'Valid token accuracy', 'Model', ''].map((t) => h('th', { scope: 'col' }, t)))), ckBody)),
    h('section', { class: 'card', 'aria-labelledby': 'ev-title' }, h('h2', { id: 'ev-title' }, 'Events'), log));

  // step → value, per curve; a step's eval event repeats its train values.
  const curves = { train_loss: new Map(), valid_loss: new Map(), train_mean_token_accuracy: new Map(), valid_mean_token_accuracy: new Map() };
  const pts = (m) => [...m.entries()].sort((a, b) => a[0] - b[0]);
  const redraw = () => {
    drawChart(lossSvg, { title: 'Loss', xLabel: 'step', yLabel: 'loss', series: [
      { name: 'train', points: pts(curves.train_loss) },
      { name: 'validation', points: pts(curves.valid_loss), dashed: true }] });
    drawChart(accSvg, { title: 'Token accuracy', xLabel: 'step', yLabel: 'accuracy', series: [
      { name: 'train', points: pts(curves.train_mean_token_accuracy) },
      { name: 'validation', points: pts(curves.valid_mean_token_accuracy), dashed: true }] });
  };
  redraw();

  let job = null;
  const showJob = async () => {
    job = await api('GET', `/v1/fine_tuning/jobs/${id}`, undefined, signal);
    const ad = (job.method && job.method.supervised && job.method.supervised.adapter) || {};
    const act = (verb) => h('button', { type: 'button', class: verb === 'cancel' ? 'danger' : 'secondary', onclick: async () => {
      try { await api('POST', `/v1/fine_tuning/jobs/${id}/${verb}`, {}); } catch (e) { progress.textContent = e.message; }
      showJob();
    } }, verb[0].toUpperCase() + verb.slice(1));
    // replaceChildren would show a null as the text "null": wrap in h() which skips them.
    head.replaceChildren(h('div', {},
      h('h1', {}, 'Job ', h('span', { class: 'mono' }, job.id), ' ', statusBadge(job.status)),
      h('p', { class: 'muted' }, `${ad.type || ''} on ${job.model}`, job.user_provided_suffix ? ` · suffix ${job.user_provided_suffix}` : '',
        ` · created ${fmtTime(job.created_at)}`, job.trained_tokens ? ` · ${job.trained_tokens} tokens trained` : ''),
      job.error ? h('p', { class: 'error', role: 'alert' }, job.error.message) : null,
      h('div', { class: 'actions' },
        job.status === 'running' ? act('pause') : null,
        job.status === 'paused' ? act('resume') : null,
        DONE.includes(job.status) ? null : act('cancel'),
        job.fine_tuned_model ? chatButton(job.model, job.fine_tuned_model, 'Chat with the result') : null)));
    const ck = await api('GET', `/v1/fine_tuning/jobs/${id}/checkpoints?limit=100`, undefined, signal);
    ckBody.replaceChildren(...(ck.data.length ? ck.data.map((c) => h('tr', { 'data-step': c.step_number },
      h('td', {}, c.step_number),
      h('td', { class: 'num' }, fmtNum(c.metrics && c.metrics.train_loss)),
      h('td', { class: 'num' }, fmtNum(c.metrics && c.metrics.valid_loss)),
      h('td', { class: 'num' }, fmtNum(c.metrics && c.metrics.valid_mean_token_accuracy)),
      h('td', { class: 'mono' }, c.fine_tuned_model_checkpoint),
      h('td', {}, chatButton(job.model, c.fine_tuned_model_checkpoint, `Chat with step ${c.step_number}`))))
      : [h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'No checkpoint yet.'))]));
  };
  await showJob();

  for await (const e of sse('GET', `/v1/fine_tuning/jobs/${id}/events?stream=true`, undefined, signal)) {
    if (e.type === 'metrics' && e.data && typeof e.data.step === 'number') {
      for (const k of Object.keys(curves)) {
        if (typeof e.data[k] === 'number') curves[k].set(e.data.step, e.data[k]);
      }
      redraw();
      if (e.data.total_steps) {
        progress.textContent = `Step ${e.data.step} of ${e.data.total_steps}` +
          (typeof e.data.train_loss === 'number' ? `: training loss ${fmtNum(e.data.train_loss)}` : '');
      }
    } else {
      await showJob();
    }
    log.prepend(h('li', {}, `${fmtTime(e.created_at)} — ${e.message}`));
  }
  await showJob();
  if (DONE.includes(job.status)) progress.textContent = `The job ${job.status.replace('_', ' ')}.`;
}
