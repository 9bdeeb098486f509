// The Prometheus text exposition format (what GET /metrics answers), parsed, and quantiles
// estimated from histogram buckets the way Prometheus' histogram_quantile does (linear within
// the bucket that holds the rank).

// [{name, labels: {k: v}, value}] for every sample line.
export function parseProm(text) {
  const out = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    let l;
    while ((l = re.exec(m[3] || ''))) {
      labels[l[1]] = l[2].replace(/\\n/g, '\n').replace(/\\"/g, '"').replace(/\\\\/g, '\\');
    }
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

// The q-quantile of cumulative buckets [{le, count}] (le = +Inf last); null without samples.
export function quantile(buckets, q) {
  const b = [...buckets].sort((a, c) => a.le - c.le);
  if (!b.length) return null;
  const total = b[b.length - 1].count;
  if (!(total > 0)) return null;
  const rank = q * total;
  let prevLe = 0, prevCount = 0;
  for (const { le, count } of b) {
    if (count >= rank) {
      if (le === Infinity) return prevLe; // above the last finite bound: report that bound
      if (count === prevCount) return le;
      return prevLe + ((le - prevLe) * (rank - prevCount)) / (count - prevCount);
    }
    prevLe = le; prevCount = count;
  }
  return prevLe;
}

// Buckets of histogram `name` grouped by the value of `label`: {value: [{le, count}]}.
export function bucketsBy(samples, name, label) {
  const out = {};
  for (const s of samples) {
    if (s.name !== `${name}_bucket`) continue;
    const key = s.labels[label];
    if (key === undefined) continue;
    const le = s.labels.le === '+Inf' ? Infinity : Number(s.labels.le);
    (out[key] = out[key] || []).push({ le, count: s.value });
  }
  return out;
}

// Sum of the series `name` per value of `label`: {value: sum}.
export function sumBy(samples, name, label) {
  const out = {};
  for (const s of samples) {
    if (s.name !== name) continue;
    const key = s.labels[label];
    if (key === undefined) continue;
    out[key] = (out[key] || 0) + s.value;
  }
  return out;
}

// Buckets with the counts of `before` subtracted (the samples of one polling interval).
export function bucketDelta(now, before) {
  if (!before) return now;
  return now.map((b) => {
    const old = before.find((x) => x.le === b.le);
    return { le: b.le, count: b.count - (old ? old.count : 0) };
  });
}
