// oodforge /ui: the detector page: pick a detector, read its card, score images through POST /score.
"use strict";

const state = { name: null, card: null, marks: [] };
const PARALLEL = 4;

function byId(id) { return document.getElementById(id); }

async function loadDetectors() {
  byId("page-error").textContent = "";
  let listing;
  try {
    listing = await apiJson("/detectors");
  } catch (err) {
    byId("page-error").textContent = err.message;
    return;
  }
  const select = byId("detector");
  const wanted = new URLSearchParams(location.search).get("detector") || listing.default;
  select.replaceChildren(...listing.detectors.map((d) =>
    el("option", { value: d.detector.name, selected: d.detector.name === wanted ? "" : null },
      `${d.detector.name} (${d.kind}${d.default ? ", default" : ""})`)));
  const failed = Object.entries(listing.failed || {});
  byId("status").textContent = failed.length ? `not loaded: ${failed.map(([n, why]) => `${n}: ${why}`).join("; ")}` : "";
  if (!listing.detectors.length) { byId("page-error").textContent = "this server has no detector loaded"; return; }
  await loadCard(select.value);
}

async function loadCard(name) {
  state.name = name;
  state.marks = [];
  byId("results").replaceChildren();
  try {
    state.card = await apiJson(`/ui/api/detectors/${encodeURIComponent(name)}`);
  } catch (err) {
    byId("page-error").textContent = err.message;
    return;
  }
  const url = new URL(location.href);
  url.searchParams.set("detector", name);
  history.replaceState(null, "", url);
  renderCard(state.card);
  redraw();
}

function redraw() {
  const card = state.card;
  if (!card) return;
  drawHistogram(byId("histogram"), card.histogram, card.info.threshold.value, state.marks);
  byId("histogram-note").textContent = card.histogram
    ? `${card.info.threshold.n_samples} ${card.info.threshold.split} ID images; the threshold accepts ${(card.info.threshold.target_id_tpr * 100).toFixed(0)}% of them`
    : card.no_histogram;
}

function entries(obj) {
  return Object.entries(obj || {}).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ");
}

function metricsTable(metrics) {
  const sets = metrics.ood || {};
  const names = ["auroc", "fpr95", "aupr_in", "aupr_out"];
  const rows = Object.entries(sets).map(([set, m]) => el("tr", {}, el("td", {}, set), el("td", {}, m.shift || ""), ...names.map((n) => el("td", {}, m[n] === undefined ? "" : fmt(m[n])))));
  for (const group of ["near", "far"]) {
    if (metrics[group]) rows.push(el("tr", {}, el("td", {}, el("b", {}, `${group} mean`)), el("td", {}), ...names.map((n) => el("td", {}, metrics[group][n] === undefined ? "" : fmt(metrics[group][n])))));
  }
  if (!rows.length) return el("pre", {}, JSON.stringify(metrics, null, 1));
  return el("div", {},
    metrics.id_accuracy === undefined ? null : el("p", {}, `ID accuracy ${fmt(metrics.id_accuracy)}`, metrics.benchmark ? ` · benchmark ${metrics.benchmark}` : ""),
    el("table", { class: "metrics" }, el("tr", {}, ...["OOD set", "shift", "AUROC", "FPR@95", "AUPR-in", "AUPR-out"].map((h) => el("th", {}, h))), rows));
}

function renderCard(card) {
  const info = card.info, t = info.threshold, prov = card.provenance, training = prov.training || {};
  const items = [
    ["name", `${info.detector.name} (version ${info.detector.version || "?"})`],
    ["kind", info.kind],
    ["classes", info.classes.join(", ")],
    ["input", `${info.input.shape.join("×")} ${info.input.mode}, background ${JSON.stringify(info.input.background)}`],
    ["pre-processing", entries(card.preprocess)],
    ["score", `${info.score.name}${Object.keys(info.score.params || {}).length ? ` (${entries(info.score.params)})` : ""}`],
    ["threshold", `${fmt(t.value)}: is_ood = score < threshold`],
    ["calibration", `${t.split} split, ${t.n_samples} ID images, target ID TPR ${t.target_id_tpr}`],
    ["rule", t.rule],
    ["created", info.detector.created],
    ["training", [training.method, training.epochs !== undefined ? `${training.epochs} epochs` : null, training.seed !== undefined ? `seed ${training.seed}` : null].filter(Boolean).join(", ") || "not recorded"],
  ];
  if (training.score_selection) items.push(["score selection", `${training.score_selection.chosen}: ${training.score_selection.criterion}`]);
  const datasets = card.outliers.length
    ? el("ul", {}, card.outliers.map((d) => el("li", {}, d.available
      ? el("a", { href: `/ui/outliers?dir=${encodeURIComponent(d.dir)}` }, d.dir)
      : el("span", { class: "muted", title: d.why }, `${d.dir} (not on this server)`))))
    : el("span", { class: "muted" }, "none named in its provenance");
  byId("card").replaceChildren(
    el("dl", { class: "card", id: "card-fields" }, items.map(([k, v]) => [el("dt", {}, k), el("dd", { "data-field": k }, v)]),
      el("dt", {}, "outlier datasets"), el("dd", {}, datasets)),
    el("h2", {}, "Metrics at export"), metricsTable(info.metrics || {}),
    el("details", {}, el("summary", {}, "provenance (versions, training arguments)"), el("pre", {}, JSON.stringify(prov, null, 1))));
}

function resultEntry(file) {
  const thumb = el("img", { alt: "", src: URL.createObjectURL(file) });
  thumb.addEventListener("error", () => thumb.remove());
  const verdict = el("div", { class: "verdict" }, el("span", { class: "badge pending" }, "scoring…"));
  const item = el("li", { class: "result pending" }, thumb, el("div", {}, el("div", { class: "name" }, file.name || "(no name)"), verdict));
  byId("results").append(item);
  return { item, verdict };
}

async function scoreOne(file, name) {
  const { item, verdict } = resultEntry(file);
  const body = new FormData();
  body.append("files", file, file.name);
  let answer;
  try {
    answer = await apiJson(`/score?detector=${encodeURIComponent(name)}`, { method: "POST", body });
  } catch (err) {
    item.className = "result failed";
    verdict.replaceChildren(el("div", { class: "error" }, `refused (HTTP ${err.status || "?"}): ${err.message}`));
    return;
  }
  if (name !== state.name) return;
  const r = answer.results[0];
  state.marks.push({ score: r.score, is_ood: r.is_ood, name: file.name });
  const n = state.marks.length;
  item.className = `result ${r.is_ood ? "ood" : "id"}`;
  item.dataset.index = String(n);
  verdict.replaceChildren(
    el("span", { class: `badge ${r.is_ood ? "ood" : "id"}` }, r.is_ood ? "OOD" : "ID"), ` #${n} `,
    el("div", { class: "label" }, r.label === null ? "" : `label ${r.label} (confidence ${r.confidence.toFixed(3)})`),
    el("div", { class: "score" }, `score ${fmt(r.score)} vs threshold ${fmt(r.threshold)}`));
  redraw();
}

async function scoreFiles(files) {
  const name = state.name, queue = Array.from(files);
  const worker = async () => { while (queue.length) await scoreOne(queue.shift(), name); };
  await Promise.all(Array.from({ length: Math.min(PARALLEL, queue.length) }, worker));
}

function setupDrop() {
  const drop = byId("drop"), input = byId("files");
  input.addEventListener("change", () => { scoreFiles(input.files); input.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); scoreFiles(e.dataTransfer.files); });
}

byId("detector").addEventListener("change", (e) => loadCard(e.target.value));
setupAuth(loadDetectors);
setupDrop();
loadDetectors();
