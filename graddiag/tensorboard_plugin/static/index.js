// graddiag's Gradients tab for TensorBoard (a dynamic plugin; TensorBoard imports this module in an
// iframe whose base URL is /data/plugin/graddiag/ and calls render()).
//
// Every string from the logs (run and layer names, messages) reaches the page through textContent,
// Option() or canvas fillText only; nothing here parses data as HTML.

const LABEL_W = 240; // px, the layer-name column (every row is labelled)
const ROW_H = 14; // px per layer row
const CHART_H = 64;
const TIMELINE_H = 16;
const POLL_MS = 10000;
const COLORS = {
  zero: '#ffffff',
  missing: '#c8c8c8',
  nonfinite: '#ff1f5a',
  error: '#d7191c',
  warning: '#f28e00',
  info: '#1f9bde',
};
const SERIES = [
  ['global_norm', 'global norm'],
  ['clip_coef', 'clip coefficient'],
  ['loss', 'loss'],
];
// viridis, sampled
const VIRIDIS = [
  [68, 1, 84], [72, 40, 120], [62, 73, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37],
];

const state = {runs: [], panels: [], selected: {}};

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = String(text);
  return e;
}

async function fetchJSON(url) {
  const response = await fetch(url);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    throw new Error((body && body.error) || `${url}: HTTP ${response.status}`);
  }
  return body;
}

function viridis(t) {
  t = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(t));
  const f = t - i;
  return VIRIDIS[i].map((a, k) => Math.round(a + (VIRIDIS[i + 1][k] - a) * f));
}

function hexRgb(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

function fmt(x) {
  if (x === null || x === undefined) return '—';
  if (x === 0) return '0';
  const a = Math.abs(x);
  return a >= 1e4 || a < 1e-3 ? x.toExponential(2) : x.toPrecision(4);
}

function stepText(data, c) {
  const a = data.columns.first[c];
  const b = data.columns.last[c];
  return a === b ? `step ${a}` : `steps ${a}–${b}`;
}

// -- layout ------------------------------------------------------------------------------------

export async function render() {
  const css = document.createElement('link');
  css.rel = 'stylesheet';
  css.href = './static/style.css';
  document.head.appendChild(css);

  const bar = el('div', 'gd-bar');
  const run1 = el('select', 'gd-run');
  const run2 = el('select', 'gd-run2');
  const status = el('span', 'gd-status');
  bar.append(el('label', null, 'Run '), run1, el('label', null, ' compare with '), run2, status);
  const legend = el('div', 'gd-legend');
  const panels = el('div', 'gd-panels');
  const tooltip = el('div', 'gd-tooltip');
  tooltip.hidden = true;
  document.body.append(bar, legend, panels, tooltip);
  Object.assign(state, {run1, run2, status, legend, panelsEl: panels, tooltip});
  run1.onchange = () => loadPanels();
  run2.onchange = () => loadPanels();
  window.addEventListener('resize', () => {
    clearTimeout(state.resizeTimer);
    state.resizeTimer = setTimeout(() => loadPanels(), 300);
  });
  await refreshRuns();
  await loadPanels();
  setInterval(poll, POLL_MS);
}

function setOptions(select, names, withNone) {
  const keep = select.value;
  select.textContent = '';
  if (withNone) select.append(new Option('(none)', ''));
  for (const n of names) select.append(new Option(n, n));
  if ([...select.options].some((o) => o.value === keep)) select.value = keep;
}

async function refreshRuns() {
  try {
    state.runs = (await fetchJSON('./runs')).runs;
  } catch (e) {
    state.status.textContent = ` cannot list runs: ${e.message}`;
    return;
  }
  const names = state.runs.map((r) => r.run);
  setOptions(state.run1, names, false);
  setOptions(state.run2, names, true);
  if (!names.length) state.status.textContent = ' no run with gradient data in this logdir yet';
}

function plotWidth(n) {
  const total = Math.max(400, state.panelsEl.clientWidth || document.body.clientWidth);
  return Math.max(120, Math.floor((total - 16 * (n - 1)) / n) - LABEL_W - 24);
}

async function loadPanels() {
  const names = [state.run1.value];
  if (state.run2.value && state.run2.value !== state.run1.value) names.push(state.run2.value);
  if (!names[0]) return;
  const width = plotWidth(names.length);
  const cols = Math.max(10, Math.min(1000, width));
  state.status.textContent = ' loading…';
  let datas;
  try {
    datas = await Promise.all(
        names.map((n) => fetchJSON(`./run?run=${encodeURIComponent(n)}&cols=${cols}`)));
  } catch (e) {
    state.status.textContent = ` ${e.message}`;
    return;
  }
  state.status.textContent = '';
  drawAll(datas, width);
}

async function poll() {
  await refreshRuns();
  const versions = Object.fromEntries(state.runs.map((r) => [r.run, r.version]));
  if (state.panels.some((p) => versions[p.data.run] !== p.data.version) ||
      state.panels.length !== (state.run2.value && state.run2.value !== state.run1.value ? 2 : 1)) {
    await loadPanels();
  }
}

function sharedRange(datas) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const d of datas) {
    if (d.range) {
      lo = Math.min(lo, d.range[0]);
      hi = Math.max(hi, d.range[1]);
    }
  }
  if (!isFinite(lo)) return [-1, 1];
  return lo === hi ? [lo - 0.5, hi + 0.5] : [lo, hi];
}

function drawAll(datas, width) {
  const range = sharedRange(datas);
  state.tooltip.hidden = true;  // its canvas is about to be replaced
  drawLegend(range);
  state.panelsEl.textContent = '';
  state.panelsEl.style.gridTemplateColumns = `repeat(${datas.length}, minmax(0, 1fr))`;
  state.panels = datas.map((d) => buildPanel(d, width, range));
  for (const p of state.panels) {
    const sel = state.selected[p.data.run];
    if (sel !== undefined && sel < p.data.findings.length) selectFinding(p, sel, false);
  }
}

function drawLegend([lo, hi]) {
  const lg = state.legend;
  lg.textContent = '';
  lg.dataset.lo = String(lo);
  lg.dataset.hi = String(hi);
  const bar = el('canvas', 'gd-colorbar');
  bar.width = 200;
  bar.height = 12;
  const ctx = bar.getContext('2d');
  for (let x = 0; x < 200; x++) {
    ctx.fillStyle = `rgb(${viridis(x / 199).join(',')})`;
    ctx.fillRect(x, 0, 1, 12);
  }
  lg.append(el('span', null, 'log10 gradient norm (shared by the runs shown): '),
      el('span', null, `${lo.toFixed(1)} `), bar, el('span', null, ` ${hi.toFixed(1)}`));
  for (const [k, name] of [['zero', 'exactly zero'], ['missing', 'no gradient / not logged'],
    ['nonfinite', 'NaN/Inf']]) {
    const sw = el('span', 'gd-swatch');
    sw.style.background = COLORS[k];
    lg.append(sw, el('span', null, name));
  }
  for (const s of ['error', 'warning', 'info']) {
    const sw = el('span', 'gd-swatch gd-mark');
    sw.style.borderColor = COLORS[s];
    lg.append(sw, el('span', null, `${s} finding`));
  }
}

function sideLabel(text) {
  const d = el('div', 'gd-side', text);
  d.style.width = `${LABEL_W}px`;
  return d;
}

function canvas(cls, w, h) {
  const c = el('canvas', cls);
  c.width = w;
  c.height = h;
  c.style.width = `${w}px`;
  c.style.height = `${h}px`;
  return c;
}

function buildPanel(data, width, range) {
  const L = data.layers.length;
  const C = data.columns.first.length;
  const colW = width / Math.max(1, C);
  const sec = el('section', 'gd-panel');
  sec.dataset.run = data.run;
  const p = {data, sec, colW, width, steplines: []};
  sec.append(el('h2', null, data.run),
      el('div', 'gd-sub', `${L} layers · ${data.steps.count} steps (${data.steps.first}–` +
        `${data.steps.last})` + (data.stride > 1 ? ` · ${data.stride} steps per column` : '') +
        ` · ${data.findings.length} findings`));
  for (const n of data.notes) sec.append(el('div', 'gd-note', n));

  // timeline: one mark per finding
  const tl = el('div', 'gd-row');
  const tlc = canvas('gd-timeline', width, TIMELINE_H);
  tl.append(sideLabel('findings'), tlc);
  drawTimeline(tlc, data, colW);
  sec.append(tl);

  // heatmap with a label per row
  const scroll = el('div', 'gd-heat-scroll');
  const heat = el('div', 'gd-heat');
  const labels = el('div', 'gd-labels');
  labels.style.width = `${LABEL_W}px`;
  data.layers.forEach((name, j) => {
    const lab = el('div', 'gd-row-label', name);
    lab.title = name;
    lab.dataset.row = String(j);
    lab.style.height = `${ROW_H}px`;
    labels.append(lab);
  });
  const plot = el('div', 'gd-plot');
  const hc = canvas('gd-heatmap', width, L * ROW_H);
  drawHeatmap(hc, data, range, colW);
  const hl = el('div', 'gd-highlight');
  hl.hidden = true;
  plot.append(hc, hl, stepline(p));
  heat.append(labels, plot);
  scroll.append(heat);
  sec.append(scroll);
  Object.assign(p, {scroll, highlight: hl});
  hc.addEventListener('mousemove', (ev) => hoverHeat(ev, p));
  hc.addEventListener('mouseleave', () => { state.tooltip.hidden = true; });

  for (const [key, title] of SERIES) {
    const row = el('div', 'gd-row');
    const wrap = el('div', 'gd-plot');
    const cc = canvas('gd-chart', width, CHART_H);
    const log = drawChart(cc, data.series[key], colW, key === 'loss' ? '#555' : '#222');
    wrap.append(cc, stepline(p));
    row.append(sideLabel(title + (log ? ' (log scale)' : '')), wrap);
    sec.append(row);
  }
  const axis = el('div', 'gd-row');
  const ac = canvas('gd-axis', width, 16);
  drawAxis(ac, data, colW);
  axis.append(sideLabel('step'), ac);
  sec.append(axis);
  sec.append(findingsTable(p));
  state.panelsEl.append(sec);
  return p;
}

function stepline(p) {
  const s = el('div', 'gd-stepline');
  s.hidden = true;
  p.steplines.push(s);
  return s;
}

// -- drawing -----------------------------------------------------------------------------------

function drawHeatmap(cv, data, [lo, hi], colW) {
  const L = data.layers.length;
  const C = data.columns.first.length;
  if (!L || !C) return;
  const img = new ImageData(C, L);
  const special = {zero: hexRgb(COLORS.zero), nonfinite: hexRgb(COLORS.nonfinite)};
  const miss = hexRgb(COLORS.missing);
  for (let j = 0; j < L; j++) {
    const row = data.heat[j];
    for (let c = 0; c < C; c++) {
      const v = row[c];
      const rgb = typeof v === 'number' ? viridis((v - lo) / (hi - lo)) :
        v === null ? miss : special[v];
      const o = 4 * (j * C + c);
      img.data[o] = rgb[0];
      img.data[o + 1] = rgb[1];
      img.data[o + 2] = rgb[2];
      img.data[o + 3] = 255;
    }
  }
  const off = document.createElement('canvas');
  off.width = C;
  off.height = L;
  off.getContext('2d').putImageData(img, 0, 0);
  const ctx = cv.getContext('2d');
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, 0, 0, cv.width, cv.height);
  // missing cells also get a diagonal hatch, so they differ from zero without colour
  ctx.strokeStyle = 'rgba(0,0,0,0.18)';
  ctx.lineWidth = 1;
  ctx.beginPath();
  for (let j = 0; j < L; j++) {
    for (let c = 0; c < C; c++) {
      if (data.heat[j][c] === null && colW >= 4) {
        ctx.moveTo(c * colW, (j + 1) * ROW_H);
        ctx.lineTo((c + 1) * colW, j * ROW_H);
      }
    }
  }
  ctx.stroke();
  ctx.strokeStyle = 'rgba(255,255,255,0.6)';
  for (let j = 1; j < L; j++) {
    ctx.beginPath();
    ctx.moveTo(0, j * ROW_H - 0.5);
    ctx.lineTo(cv.width, j * ROW_H - 0.5);
    ctx.stroke();
  }
  ctx.lineWidth = 1.5;
  for (const f of data.findings) {
    if (f.row === null) continue;
    ctx.strokeStyle = COLORS[f.severity] || '#000';
    const w = Math.max(colW, 4);
    ctx.strokeRect(f.column * colW + colW / 2 - w / 2 + 0.75, f.row * ROW_H + 0.75,
        w - 1.5, ROW_H - 1.5);
  }
}

function drawTimeline(cv, data, colW) {
  const ctx = cv.getContext('2d');
  ctx.fillStyle = '#f3f3f3';
  ctx.fillRect(0, 0, cv.width, cv.height);
  const order = {info: 0, warning: 1, error: 2};
  const fs = [...data.findings].sort((a, b) => order[a.severity] - order[b.severity]);
  for (const f of fs) {
    const x = (f.column + 0.5) * colW;
    ctx.fillStyle = COLORS[f.severity] || '#000';
    ctx.beginPath();
    ctx.moveTo(x - 5, 2);
    ctx.lineTo(x + 5, 2);
    ctx.lineTo(x, TIMELINE_H - 2);
    ctx.closePath();
    ctx.fill();
  }
}

function drawChart(cv, s, colW, color) {
  const ctx = cv.getContext('2d');
  ctx.fillStyle = '#fafafa';
  ctx.fillRect(0, 0, cv.width, cv.height);
  const vals = s.lo.concat(s.hi).filter((v) => v !== null);
  ctx.font = '10px sans-serif';
  if (!vals.length) {
    ctx.fillStyle = '#888';
    ctx.fillText(s.nonfinite.length ? 'NaN/Inf only' : 'not logged', 6, CHART_H / 2 + 3);
    markNonfinite(ctx, s, colW);
    return false;
  }
  let lo = Math.min(...vals);
  let hi = Math.max(...vals);
  const log = lo > 0 && hi / lo >= 100;
  const tf = log ? Math.log10 : (v) => v;
  let a = tf(lo);
  let b = tf(hi);
  if (a === b) {
    a -= log ? 0.5 : Math.abs(a) * 0.1 || 1;
    b += log ? 0.5 : Math.abs(b) * 0.1 || 1;
  }
  const y = (v) => CHART_H - 4 - ((tf(v) - a) / (b - a)) * (CHART_H - 8);
  ctx.fillStyle = 'rgba(80,80,200,0.18)';
  s.lo.forEach((v, c) => {
    if (v !== null && s.hi[c] !== v) {
      ctx.fillRect(c * colW, y(s.hi[c]), Math.max(colW, 1), y(v) - y(s.hi[c]));
    }
  });
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.2;
  ctx.beginPath();
  let pen = false;
  s.hi.forEach((v, c) => {
    if (v === null) {
      pen = false;
      return;
    }
    const x = (c + 0.5) * colW;
    if (pen) ctx.lineTo(x, y(v)); else ctx.moveTo(x, y(v));
    pen = true;
  });
  ctx.stroke();
  markNonfinite(ctx, s, colW);
  ctx.fillStyle = '#333';
  ctx.fillText(fmt(hi), 3, 10);
  ctx.fillText(fmt(lo), 3, CHART_H - 3);
  return log;
}

function markNonfinite(ctx, s, colW) {
  ctx.fillStyle = COLORS.nonfinite;
  for (const c of s.nonfinite) ctx.fillRect(c * colW, 0, Math.max(colW, 2), CHART_H);
}

function drawAxis(cv, data, colW) {
  const ctx = cv.getContext('2d');
  ctx.font = '10px sans-serif';
  ctx.fillStyle = '#333';
  const C = data.columns.first.length;
  const n = Math.max(1, Math.min(8, Math.floor(cv.width / 90)));
  for (let i = 0; i <= n && C; i++) {
    const c = Math.min(C - 1, Math.round((i / n) * (C - 1)));
    const x = (c + 0.5) * colW;
    ctx.fillRect(x, 0, 1, 4);
    const t = String(data.columns.first[c]);
    const w = ctx.measureText(t).width;
    ctx.fillText(t, Math.min(cv.width - w, Math.max(0, x - w / 2)), 14);
  }
}

// -- interaction -------------------------------------------------------------------------------

function cellText(data, j, c) {
  const v = data.heat[j][c];
  const many = data.stride > 1 ? ' (largest in the column)' : '';
  if (typeof v === 'number') return `grad norm ${fmt(10 ** v)} (log10 ${v.toFixed(2)})${many}`;
  if (v === 'zero') return 'gradient exactly zero';
  if (v === 'nonfinite') return 'NaN/Inf gradient';
  return 'no gradient (missing / not logged)';
}

function hoverHeat(ev, p) {
  const r = ev.target.getBoundingClientRect();
  const c = Math.floor((ev.clientX - r.left) / p.colW);
  const j = Math.floor((ev.clientY - r.top) / ROW_H);
  const d = p.data;
  if (j < 0 || j >= d.layers.length || c < 0 || c >= d.columns.first.length) {
    state.tooltip.hidden = true;
    return;
  }
  const t = state.tooltip;
  t.textContent = `${d.layers[j]}\n${stepText(d, c)}\n${cellText(d, j, c)}`;
  t.hidden = false;
  t.style.left = `${Math.min(ev.clientX + 12, window.innerWidth - 320)}px`;
  t.style.top = `${ev.clientY + 12}px`;
}

function findingsTable(p) {
  const wrap = el('div', 'gd-findings');
  const fs = p.data.findings;
  wrap.append(el('h3', null, `Findings (${fs.length}) — click one to locate it`));
  const table = el('table');
  const head = el('tr');
  for (const h of ['severity', 'kind', 'layer', 'step', 'message', 'suggestion']) {
    head.append(el('th', null, h));
  }
  table.append(head);
  fs.forEach((f, i) => {
    const tr = el('tr', `gd-finding gd-${f.severity}`);
    tr.dataset.index = String(i);
    tr.append(el('td', 'gd-sev', f.severity), el('td', null, f.kind),
        el('td', 'gd-layer', f.layer === null ? '(whole model)' : f.layer),
        el('td', null, f.step), el('td', null, f.message), el('td', null, f.suggestion));
    tr.addEventListener('click', () => selectFinding(p, i, true));
    table.append(tr);
  });
  const scroll = el('div', 'gd-findings-scroll');
  scroll.append(table);
  wrap.append(scroll);
  p.table = table;
  return wrap;
}

function selectFinding(p, i, scroll) {
  const f = p.data.findings[i];
  state.selected[p.data.run] = i;
  for (const tr of p.table.querySelectorAll('tr.gd-finding')) {
    tr.classList.toggle('gd-selected', tr.dataset.index === String(i));
  }
  const x = f.column * p.colW;
  for (const s of p.steplines) {
    s.hidden = false;
    s.style.left = `${x + p.colW / 2 - 1}px`;
  }
  const hl = p.highlight;
  if (f.row === null) {
    hl.hidden = true;
  } else {
    const w = Math.max(p.colW, 6);
    hl.hidden = false;
    hl.style.left = `${x + p.colW / 2 - w / 2}px`;
    hl.style.top = `${f.row * ROW_H}px`;
    hl.style.width = `${w}px`;
    hl.style.height = `${ROW_H}px`;
    hl.dataset.row = String(f.row);
    hl.dataset.step = String(f.step);
    if (scroll) {
      const top = f.row * ROW_H;
      const sc = p.scroll;
      if (top < sc.scrollTop || top + ROW_H > sc.scrollTop + sc.clientHeight) {
        sc.scrollTop = Math.max(0, top - sc.clientHeight / 2);
      }
      const box = sc.getBoundingClientRect();
      if (box.top < 0 || box.top > window.innerHeight / 2) {
        window.scrollBy(0, box.top - 8);  // the heatmap back in view
      }
    }
  }
  p.sec.dataset.selectedStep = String(f.step);
  p.sec.dataset.selectedLayer = f.layer === null ? '' : f.layer;
}
