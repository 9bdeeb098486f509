// The Compare page: one prompt sent to the base model and up to three variants at once, each
// answer streamed into its own column (`stream: true` chat completions), with the sampling
// settings used, token counts (the stream's usage chunk), time to first token and speed.
import { api, sse, h } from './api.js';

const SLOTS = 4;

function num(id, label, value, attrs) {
  return h('div', { class: 'field' }, h('label', { for: id }, label),
    h('input', Object.assign({ id, type: 'number', value, step: 'any' }, attrs)));
}

async function streamInto(slot, body, signal) {
  const text = slot.querySelector('.text');
  const stats = slot.querySelector('.stats');
  slot.dataset.state = 'streaming';
  slot.setAttribute('aria-busy', 'true');
  text.textContent = '';
  stats.textContent = 'waiting…';
  const started = performance.now();
  let first = null, chunks = 0, usage = null, finish = null;
  try {
    for await (const c of sse('POST', '/v1/chat/completions', body, signal)) {
      if (c.error) throw new Error(c.error.message);
      if (c.usage) usage = c.usage;
      for (const ch of c.choices || []) {
        const piece = ch.delta && ch.delta.content;
        if (piece) {
          if (first === null) first = performance.now();
          chunks++;
          text.textContent += piece;
        }
        if (ch.finish_reason) finish = ch.finish_reason;
      }
      stats.textContent = `${chunks} chunks so far`;
    }
    const secs = (performance.now() - started) / 1000;
    const out = usage ? usage.completion_tokens : chunks;
    const speed = first !== null && out > 1 ? (out - 1) / ((performance.now() - first) / 1000) : null;
    stats.textContent = [
      usage ? `prompt ${usage.prompt_tokens} tokens, answer ${usage.completion_tokens} tokens` : `${chunks} chunks`,
      first !== null ? `first token after ${Math.round(first - started)} ms` : null,
      speed ? `${speed.toFixed(1)} tokens/s` : null,
      `${secs.toFixed(1)} s in all`,
      finish ? `finish: ${finish}` : null,
    ].filter(Boolean).join(' · ');
    slot.dataset.tokens = String(out);
    slot.dataset.state = 'done';
  } catch (e) {
    if (e.name === 'AbortError') return;
    stats.textContent = '';
    text.append(h('span', { class: 'error', role: 'alert' }, e.message));
    slot.dataset.state = 'error';
  } finally {
    slot.removeAttribute('aria-busy');
  }
}

export async function comparePage(ctx) {
  const models = (await api('GET', '/v1/models', undefined, ctx.signal)).data;
  const bases = models.filter((m) => !m.parent).map((m) => m.id);
  const variants = models.filter((m) => m.parent).map((m) => m.id);
  const wanted = (ctx.params.get('models') || '').split(',').filter(Boolean);
  const selects = [];
  for (let i = 0; i < SLOTS; i++) {
    const opts = i === 0 ? bases : ['', ...variants];
    const pick = i === 0 ? (bases.includes(wanted[0]) ? wanted[0] : bases[0]) : (wanted[i] && variants.includes(wanted[i]) ? wanted[i] : '');
    selects.push(h('select', { id: `c-model-${i}` }, opts.map((m) => h('option', { value: m, selected: m === pick }, m || '(none)'))));
  }
  const prompt = h('textarea', { id: 'c-prompt', required: true }, 'What should I order tonight?');
  const system = h('input', { id: 'c-system', type: 'text', placeholder: 'optional' });
  const answers = h('div', { class: 'answers', id: 'answers', 'aria-live': 'polite' });
  const settingsNote = h('p', { id: 'c-settings', class: 'muted' });
  const send = h('button', { type: 'submit', id: 'c-send' }, 'Send to all');
  const form = h('form', { id: 'compare-form' },
    h('div', { class: 'models' }, selects.map((s, i) => h('div', { class: 'field' },
      h('label', { for: s.id }, i === 0 ? 'Base model' : `Variant ${i}`), s))),
    h('div', { class: 'field' }, h('label', { for: 'c-system' }, 'System message'), system),
    h('div', { class: 'field' }, h('label', { for: 'c-prompt' }, 'Prompt'), prompt),
    h('fieldset', {}, h('legend', {}, 'Sampling (the same for every column)'),
      h('div', { class: 'row' },
        num('c-temperature', 'Temperature', '0', { min: '0', max: '2' }),
        num('c-top-p', 'Top p', '1', { min: '0', max: '1' }),
        num('c-max-tokens', 'Max tokens', '48', { min: '1', step: '1' }),
        num('c-seed', 'Seed', '', { step: '1', placeholder: 'random' }))),
    h('div', { class: 'row' }, send));
  ctx.root.append(h('h1', {}, 'Compare'),
    h('section', { class: 'card', 'aria-label': 'Prompt and models' }, form),
    settingsNote, answers);

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const chosen = selects.map((s) => s.value).filter(Boolean);
    const messages = [];
    if (system.value.trim()) messages.push({ role: 'system', content: system.value.trim() });
    messages.push({ role: 'user', content: prompt.value });
    const sampling = {
      temperature: Number(form.querySelector('#c-temperature').value || 0),
      top_p: Number(form.querySelector('#c-top-p').value || 1),
      max_tokens: Number(form.querySelector('#c-max-tokens').value || 48),
    };
    const seed = form.querySelector('#c-seed').value.trim();
    if (seed !== '') sampling.seed = Number(seed);
    settingsNote.textContent = `Sampling: ${Object.entries(sampling).map(([k, v]) => `${k}=${v}`).join(', ')}`;
    const slots = chosen.map((m, i) => h('article', { class: 'answer', 'data-model': m, 'aria-label': `Answer of ${m}` },
      h('h2', { class: 'mono' }, i === 0 ? 'Base · ' : `Variant ${i} · `, m),
      h('div', { class: 'text' }), h('div', { class: 'stats' })));
    answers.replaceChildren(...slots);
    send.disabled = true;
    await Promise.all(chosen.map((model, i) => streamInto(slots[i], Object.assign({
      model, messages, stream: true, stream_options: { include_usage: true },
    }, sampling), ctx.signal)));
    send.disabled = false;
  });
}
