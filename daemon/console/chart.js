// Hand-drawn SVG line charts: one or more series of [x, y] points on shared linear axes. The
// SVG carries `data-points` (how many points it draws) and an aria-label stating each series'
// latest value, so screen readers and tests can read what the picture shows.

const NS = 'http://www.w3.org/2000/svg';
const W = 640, H = 260, L = 56, R = 14, T = 14, B = 44;

function s(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// Round tick labels: 3 significant digits, no trailing zeros.
function tick(v) {
  if (v === 0) return '0';
  return Number(v.toPrecision(3)).toString();
}

// Redraws `svg` with `series` = [{name, points: [[x, y], ...], dashed}].
export function drawChart(svg, { series, xLabel, yLabel, title }) {
  svg.replaceChildren();
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  svg.setAttribute('role', 'img');
  const all = series.flatMap((se) => se.points);
  svg.dataset.points = String(all.length);
  const latest = series
    .filter((se) => se.points.length)
    .map((se) => `${se.name} ${tick(se.points[se.points.length - 1][1])} at ${xLabel} ${se.points[se.points.length - 1][0]}`);
  svg.setAttribute('aria-label', `${title}: ${latest.length ? latest.join(', ') : 'no data yet'}`);
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (!all.length) { x0 = 0; x1 = 1; y0 = 0; y1 = 1; }
  if (x1 === x0) { x1 = x0 + 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const pad = (y1 - y0) * 0.05;
  y0 -= pad; y1 += pad;
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    svg.append(s('line', { class: 'grid', x1: L, x2: W - R, y1: py(y), y2: py(y) }));
    svg.append(s('text', { x: L - 6, y: py(y) + 4, 'text-anchor': 'end' }, tick(y)));
  }
  const xs = [...new Set(all.map((p) => p[0]))].sort((a, b) => a - b);
  const step = Math.max(1, Math.ceil(xs.length / 8));
  xs.filter((_, i) => i % step === 0).forEach((x) => {
    svg.append(s('text', { x: px(x), y: H - B + 16, 'text-anchor': 'middle' }, tick(x)));
  });
  svg.append(s('line', { class: 'axis', x1: L, x2: W - R, y1: H - B, y2: H - B }));
  svg.append(s('line', { class: 'axis', x1: L, x2: L, y1: T, y2: H - B }));
  svg.append(s('text', { x: (L + W - R) / 2, y: H - 6, 'text-anchor': 'middle' }, xLabel));
  svg.append(s('text', { x: 12, y: (T + H - B) / 2, 'text-anchor': 'middle', transform: `rotate(-90 12 ${(T + H - B) / 2})` }, yLabel));
  series.forEach((se, i) => {
    const cls = `s${i % 4}`;
    if (se.points.length > 1) {
      svg.append(s('polyline', {
        class: `${cls}${se.dashed ? ' dashed' : ''}`,
        points: se.points.map((p) => `${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(' '),
      }));
    }
    if (se.points.length <= 40) {
      se.points.forEach((p) => svg.append(s('circle', { class: cls, cx: px(p[0]), cy: py(p[1]), r: 3 })));
    }
    const lx = L + 10 + i * 150;
    svg.append(s('rect', { class: cls, x: lx, y: T + 2, width: 14, height: 4 }));
    svg.append(s('text', { class: 'legend', x: lx + 18, y: T + 8 }, se.name));
  });
}

export function chartSvg(id, title) {
  const svg = document.createElementNS(NS, 'svg');
  svg.id = id;
  svg.dataset.points = '0';
  svg.setAttribute('aria-label', `${title}: no data yet`);
  return svg;
}
