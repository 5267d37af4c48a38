// oodforge /ui: the calibration-score histogram as SVG, with the threshold and the scored images on it.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// histogram: {edges, counts} or null; marks: [{score, is_ood, label}] (the scored images).
function drawHistogram(container, histogram, threshold, marks) {
  const W = 620, H = 240, left = 44, right = 14, top = 40, bottom = 40;
  const values = [threshold, ...marks.map((m) => m.score)].filter(Number.isFinite);
  let lo = Math.min(...values), hi = Math.max(...values);
  if (histogram) { lo = Math.min(lo, histogram.edges[0]); hi = Math.max(hi, histogram.edges[histogram.edges.length - 1]); }
  if (!(hi > lo)) { lo -= 1; hi += 1; }
  const pad = (hi - lo) * 0.04; lo -= pad; hi += pad;
  const x = (v) => left + ((v - lo) / (hi - lo)) * (W - left - right);
  const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
  const base = H - bottom, tx = x(threshold), markY = top + 12;
  root.append(svg("rect", { x: left, y: top, width: Math.max(0, tx - left), height: base - top, fill: "#fbe9e7" }));
  root.append(svg("text", { x: tx - 6, y: top - 6, "font-size": 11, fill: "#c0392b", "text-anchor": "end" }, "← OOD (score < threshold)"));
  root.append(svg("text", { x: tx + 6, y: top - 6, "font-size": 11, fill: "#1f8a4c" }, "ID →"));
  if (histogram) {
    const peak = Math.max(...histogram.counts, 1);
    histogram.counts.forEach((count, i) => {
      const x0 = x(histogram.edges[i]), x1 = x(histogram.edges[i + 1]);
      const h = (count / peak) * (base - markY - 14);
      const bar = svg("rect", { class: "bin", x: x0, y: base - h, width: Math.max(1, x1 - x0 - 1), height: h, fill: "#8fa9d6" });
      bar.append(svg("title", {}, `${count} ID val images with score in [${fmt(histogram.edges[i])}, ${fmt(histogram.edges[i + 1])})`));
      root.append(bar);
    });
    root.append(svg("text", { x: left - 6, y: markY + 18, "font-size": 10, "text-anchor": "end", fill: "#5f6b7a" }, String(peak)));
  }
  root.append(svg("line", { x1: left, y1: base, x2: W - right, y2: base, stroke: "#5f6b7a" }));
  for (let i = 0; i <= 5; i++) {
    const v = lo + ((hi - lo) * i) / 5;
    root.append(svg("line", { x1: x(v), y1: base, x2: x(v), y2: base + 4, stroke: "#5f6b7a" }));
    root.append(svg("text", { x: x(v), y: base + 16, "font-size": 10, "text-anchor": "middle", fill: "#5f6b7a" }, fmt(v)));
  }
  root.append(svg("text", { x: (left + W - right) / 2, y: H - 6, "font-size": 11, "text-anchor": "middle", fill: "#1d2430" }, "score (higher = more in-distribution)"));
  root.append(svg("line", { id: "threshold-line", x1: tx, y1: top - 20, x2: tx, y2: base, stroke: "#c0392b", "stroke-width": 2, "stroke-dasharray": "5 3" }));
  root.append(svg("text", { x: tx, y: top - 24, "font-size": 11, fill: "#c0392b", "text-anchor": "middle" }, `threshold ${fmt(threshold)}`));
  const placed = [];  // [x, level] of the marks drawn so far: a close one goes one level lower
  marks.forEach((m, i) => {
    if (!Number.isFinite(m.score)) return;
    const mx = x(m.score), colour = m.is_ood ? "#c0392b" : "#1f8a4c";
    let level = 0;
    while (placed.some(([px, pl]) => pl === level && Math.abs(px - mx) < 17)) level += 1;
    placed.push([mx, level]);
    const my = markY + (level % 6) * 17;
    const g = svg("g", { class: "mark", "data-index": String(i) });
    g.append(svg("line", { x1: mx, y1: my, x2: mx, y2: base, stroke: colour, "stroke-width": 2 }));
    g.append(svg("circle", { cx: mx, cy: my, r: 8, fill: colour }));
    g.append(svg("text", { x: mx, y: my + 4, "font-size": 10, "text-anchor": "middle", fill: "#fff" }, String(i + 1)));
    g.append(svg("title", {}, `#${i + 1} ${m.name}: score ${fmt(m.score)} → ${m.is_ood ? "OOD" : "ID"}`));
    root.append(g);
  });
  container.replaceChildren(root);
}
