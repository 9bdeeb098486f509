// The Jobs page: every fine-tuning job with its status and live progress, and the form that
// uploads a JSONL dataset (POST /v1/files) and creates a job with a method and
// hyperparameters. A dataset with bad lines fails validation: its errors are listed with their
// line numbers.
import { api, h, fmtTime, ApiError } from './api.js';

const POLL_MS = 2000;
const ACTIVE = ['validating_files', 'queued', 'running', 'paused'];

// Method parameter inputs: [field, label, kind, default shown as placeholder].
const METHODS = {
  lora: [
    ['r', 'Rank r', 'int', '16'],
    ['alpha', 'Alpha', 'num', '32'],
    ['dropout', 'Dropout', 'num', '0.05'],
    ['target_modules', 'Target modules (comma-separated or all-linear)', 'list', 'all-linear'],
    ['use_rslora', 'rsLoRA scaling', 'bool'],
  ],
  prompt_tuning: [
    ['num_virtual_tokens', 'Virtual tokens', 'int', '20'],
    ['init', 'Initialisation', ['text', 'random', 'sample_vocab']],
    ['init_text', 'Initialisation text', 'str', ''],
  ],
  prefix_tuning: [
    ['num_virtual_tokens', 'Virtual tokens', 'int', '20'],
    ['prefix_projection', 'Prefix projection (MLP)', 'bool'],
    ['encoder_hidden_size', 'Projection hidden size', 'int', 'model hidden size'],
  ],
};

const HYPER = [
  ['n_epochs', 'Epochs', 'int', 'auto'],
  ['batch_size', 'Batch size', 'int', 'auto'],
  ['learning_rate_multiplier', 'Learning-rate multiplier', 'num', 'auto'],
  ['max_steps', 'Max steps', 'int', 'all'],
  ['max_seq_len', 'Max sequence length', 'int', 'default'],
  ['checkpoint_every', 'Checkpoint every (steps)', 'int', 'never'],
];

const HP = 'method.supervised.hyperparameters.';
const AD = 'method.supervised.adapter.';

export function statusBadge(status) {
  return h('span', { class: `status ${status}` }, status.replace('_', ' '));
}

function input(id, param, label, kind, placeholder) {
  if (Array.isArray(kind)) {
    return h('div', { class: 'field' }, h('label', { for: id }, label),
      h('select', { id, 'data-param': param, 'data-kind': 'str' }, kind.map((v) => h('option', { value: v }, v))));
  }
  if (kind === 'bool') {
    return h('div', { class: 'field check' }, h('input', { id, type: 'checkbox', 'data-param': param, 'data-kind': 'bool' }), h('label', { for: id }, label));
  }
  const type = kind === 'int' || kind === 'num' ? 'number' : 'text';
  return h('div', { class: 'field' }, h('label', { for: id }, label),
    h('input', { id, type, 'data-param': param, 'data-kind': kind, placeholder, step: kind === 'num' ? 'any' : (kind === 'int' ? '1' : null), min: kind === 'str' || kind === 'list' ? null : '0' }));
}

// The value of a parameter input, or undefined when left empty (the server's default).
function valueOf(el) {
  const kind = el.dataset.kind;
  if (kind === 'bool') return el.checked ? true : undefined;
  const v = el.value.trim();
  if (v === '') return undefined;
  if (kind === 'int' || kind === 'num') return Number(v);
  if (kind === 'list') return v === 'all-linear' ? v : v.split(',').map((x) => x.trim()).filter(Boolean);
  return v;
}

// A dataset error message, its `line N: ...` parts as a list.
export function datasetErrors(message) {
  const first = message.search(/line \d+:/);
  const head = first > 0 ? message.slice(0, first).replace(/:\s*$/, '') : message;
  const lines = first > 0 ? message.slice(first).split(/;\s(?=line \d+:|and \d+ more)/) : [];
  return h('div', { class: 'error', role: 'alert' },
    h('p', {}, head),
    lines.length ? h('ul', { class: 'errors-list', 'data-dataset-errors': '' }, lines.map((l) => h('li', {}, l))) : null);
}

async function upload(file) {
  const form = new FormData();
  form.append('purpose', 'fine-tune');
  form.append('file', file, file.name);
  return api('POST', '/v1/files', form);
}

function createForm(ctx, models, onCreated) {
  const methodSel = h('select', { id: 'f-method' }, Object.keys(METHODS).map((m) => h('option', { value: m }, m)));
  const methodSets = Object.fromEntries(Object.entries(METHODS).map(([m, fields]) => [m,
    h('fieldset', { 'data-method': m, hidden: m !== 'lora' }, h('legend', {}, `${m} parameters`),
      h('div', { class: 'row' }, fields.map(([f, label, kind, ph]) => input(`f-${m}-${f}`, AD + f, label, kind, ph))))]));
  methodSel.addEventListener('change', () => {
    for (const [m, fs] of Object.entries(methodSets)) fs.hidden = m !== methodSel.value;
  });
  const status = h('div', { id: 'create-status', 'aria-live': 'polite' });
  const submit = h('button', { type: 'submit', id: 'f-submit' }, 'Upload and create job');
  const form = h('form', { id: 'create-job', novalidate: true },
    h('div', { class: 'row' },
      h('div', { class: 'field' }, h('label', { for: 'f-model' }, 'Base model'),
        h('select', { id: 'f-model', 'data-param': 'model' }, models.map((m) => h('option', { value: m }, m)))),
      h('div', { class: 'field' }, h('label', { for: 'f-train' }, 'Training data (JSONL)'),
        h('input', { id: 'f-train', type: 'file', accept: '.jsonl,application/jsonl,application/x-ndjson', required: true, 'data-param': 'training_file' })),
      h('div', { class: 'field' }, h('label', { for: 'f-valid' }, 'Validation data (optional)'),
        h('input', { id: 'f-valid', type: 'file', accept: '.jsonl,application/jsonl,application/x-ndjson', 'data-param': 'validation_file' })),
      h('div', { class: 'field' }, h('label', { for: 'f-suffix' }, 'Suffix'),
        h('input', { id: 'f-suffix', type: 'text', maxlength: '64', 'data-param': 'suffix', placeholder: 'e.g. support-bot' })),
      h('div', { class: 'field' }, h('label', { for: 'f-method' }, 'Method'), methodSel)),
    Object.values(methodSets),
    h('fieldset', {}, h('legend', {}, 'Hyperparameters (empty: automatic)'),
      h('div', { class: 'row' }, HYPER.map(([f, label, kind, ph]) => input(`f-hp-${f}`, HP + f, label, kind, ph)),
        input('f-seed', 'seed', 'Seed', 'int', 'random'))),
    h('div', { class: 'row' }, submit), status);

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
    const train = form.querySelector('#f-train').files[0];
    if (!train) {
      form.querySelector('#f-train').setAttribute('aria-invalid', 'true');
      status.replaceChildren(h('p', { class: 'error', role: 'alert' }, 'Choose a JSONL training file.'));
      return;
    }
    submit.disabled = true;
    try {
      status.replaceChildren(h('p', {}, `Uploading ${train.name}…`));
      const trainFile = await upload(train);
      const valid = form.querySelector('#f-valid').files[0];
      const validFile = valid ? await upload(valid) : null;
      const method = methodSel.value;
      const adapter = { type: method };
      for (const el of methodSets[method].querySelectorAll('[data-param]')) {
        const v = valueOf(el);
        if (v !== undefined) adapter[el.dataset.param.slice(AD.length)] = v;
      }
      const hyper = {};
      for (const [f] of HYPER) {
        const v = valueOf(form.querySelector(`#f-hp-${f}`));
        if (v !== undefined) hyper[f] = v;
      }
      const body = {
        model: form.querySelector('#f-model').value,
        training_file: trainFile.id,
        method: { type: 'supervised', supervised: { hyperparameters: hyper, adapter } },
      };
      if (validFile) body.validation_file = validFile.id;
      const suffix = form.querySelector('#f-suffix').value.trim();
      if (suffix) body.suffix = suffix;
      const seed = valueOf(form.querySelector('#f-seed'));
      if (seed !== undefined) body.seed = seed;
      status.replaceChildren(h('p', {}, 'Creating the job…'));
      const job = await api('POST', '/v1/fine_tuning/jobs', body);
      status.replaceChildren(h('p', {}, `Job ${job.id} created; validating the data…`));
      onCreated();
      // Validation runs in the background: wait for its verdict before moving on.
      let j = job;
      while (j.status === 'validating_files' && !ctx.signal.aborted) {
        await new Promise((r) => setTimeout(r, 500));
        j = await api('GET', `/v1/fine_tuning/jobs/${job.id}`, undefined, ctx.signal);
      }
      if (j.status === 'failed' && j.error) {
        status.replaceChildren(datasetErrors(j.error.message));
        const bad = form.querySelector(`[data-param="${j.error.param}"]`);
        if (bad) bad.setAttribute('aria-invalid', 'true');
      } else if (!ctx.signal.aborted) {
        location.hash = `#/jobs/${job.id}`;
      }
    } catch (e) {
      if (e.name === 'AbortError') return;
      status.replaceChildren(h('p', { class: 'error', role: 'alert' }, e.message));
      if (e instanceof ApiError && e.param) {
        const bad = form.querySelector(`[data-param="${e.param}"]`);
        if (bad) { bad.setAttribute('aria-invalid', 'true'); bad.focus(); }
      }
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

// step/total of the newest metrics event of a running job.
async function progressOf(job, signal) {
  const ev = await api('GET', `/v1/fine_tuning/jobs/${job.id}/events?limit=20`, undefined, signal);
  const m = ev.data.find((e) => e.type === 'metrics' && e.data && e.data.total_steps);
  return m ? { step: m.data.step, total: m.data.total_steps } : null;
}

function jobRow(j, progress) {
  const ad = (j.method && j.method.supervised && j.method.supervised.adapter) || {};
  let prog = '';
  if (progress) {
    prog = h('span', {}, h('progress', { max: progress.total, value: progress.step, 'aria-label': `step ${progress.step} of ${progress.total}` }), ` ${progress.step}/${progress.total}`);
  } else if (j.status === 'succeeded') {
    prog = 'done';
  }
  return h('tr', { 'data-job': j.id },
    h('td', {}, h('a', { href: `#/jobs/${j.id}`, class: 'mono' }, j.id)),
    h('td', {}, j.user_provided_suffix || ''),
    h('td', {}, ad.type || ''),
    h('td', {}, statusBadge(j.status), j.error ? h('div', { class: 'error' }, j.error.message) : null),
    h('td', {}, prog),
    h('td', { class: 'num' }, j.trained_tokens ?? ''),
    h('td', {}, fmtTime(j.created_at)));
}

export async function jobsPage(ctx) {
  const models = await api('GET', '/v1/models', undefined, ctx.signal);
  const bases = models.data.filter((m) => !m.parent).map((m) => m.id);
  const tbody = h('tbody', { id: 'jobs-body' });
  const refresh = async () => {
    const list = await api('GET', '/v1/fine_tuning/jobs?limit=50', undefined, ctx.signal);
    const rows = [];
    for (const j of list.data) {
      const p = ['running', 'paused'].includes(j.status) ? await progressOf(j, ctx.signal) : null;
      rows.push(jobRow(j, p));
    }
    tbody.replaceChildren(...(rows.length ? rows : [h('tr', {}, h('td', { colspan: 7, class: 'muted' }, 'No jobs yet.'))]));
    return list.data.some((j) => ACTIVE.includes(j.status));
  };
  ctx.root.append(
    h('h1', {}, 'Fine-tuning jobs'),
    h('section', { class: 'card', 'aria-labelledby': 'new-job' }, h('h2', { id: 'new-job' }, 'New job'), createForm(ctx, bases, () => refresh())),
    h('section', { class: 'card', 'aria-labelledby': 'job-list' }, h('h2', { id: 'job-list' }, 'Jobs'),
      h('table', {}, h('thead', {}, h('tr', {}, ['Job', 'Suffix', 'Method', 'Status', 'Progress', 'Tokens', 'Created'].map((t) => h('th', { scope: 'col', class: t === 'Tokens' ? 'num' : null }, t)))), tbody)));
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), POLL_MS);
  ctx.signal.addEventListener('abort', () => clearInterval(timer));
}
