// oodforge /ui/outliers: an outlier dataset's records with their filter decisions, paged and filtered.
"use strict";

const view = { dir: "", kept: "all", source_class: "", pool: "", page: 1, pages: 1, per_page: 48 };
let shownImages = [];

function byId(id) { return document.getElementById(id); }

function readUrl() {
  const q = new URLSearchParams(location.search);
  view.dir = q.get("dir") || "";
  view.kept = q.get("kept") || "all";
  view.source_class = q.get("source_class") || "";
  view.pool = q.get("pool") ?? "pixel";
  view.page = Number(q.get("page")) || 1;
  view.per_page = Number(q.get("per_page")) || 48;
}

function writeUrl() {
  const q = new URLSearchParams({ dir: view.dir, kept: view.kept, source_class: view.source_class, pool: view.pool, page: String(view.page), per_page: String(view.per_page) });
  history.replaceState(null, "", `/ui/outliers?${q}`);
}

async function showKnown() {
  let datasets = [];
  try { datasets = await apiJson("/ui/api/datasets"); } catch (err) { byId("page-error").textContent = err.message; return; }
  byId("known").replaceChildren(el("h2", {}, "Outlier datasets named by the served detectors"),
    datasets.length ? el("ul", {}, datasets.map((d) => el("li", {},
      d.available ? el("a", { href: `/ui/outliers?dir=${encodeURIComponent(d.dir)}` }, d.dir) : el("span", { class: "muted", title: d.why }, `${d.dir} (not on this server)`),
      el("span", { class: "muted" }, ` · used by ${d.detectors.join(", ")}`))))
      : el("p", { class: "muted" }, "none: the detectors' provenance names no outlier dataset; type a directory above"));
}

function options(select, values, chosen, allLabel) {
  select.replaceChildren(el("option", { value: "" }, allLabel), ...values.map((v) => el("option", { value: v, selected: v === chosen ? "" : null }, v)));
  select.value = values.includes(chosen) ? chosen : "";
}

function renderSummary(data) {
  const card = data.card, counts = card.counts || {};
  const rows = Object.entries(counts).map(([pool, c]) => `${pool}: ${c.generated} generated, ${c.kept} kept, ${c.rejected} rejected`);
  const filter = card.filter ? `ID-near filter: k=${card.filter.k}, quantile ${card.filter.quantile}, threshold ${fmt(card.filter.threshold)}` : "";
  const generator = card.generator ? `generator ${card.generator.pretrained || JSON.stringify(card.generator)}` : "";
  byId("summary").replaceChildren(el("div", {}, el("b", {}, data.dir), data.path === data.dir ? "" : el("span", { class: "muted" }, `  (${data.path})`)), el("div", {}, rows.join(" · ")), el("div", { class: "muted" }, [generator, filter].filter(Boolean).join(" · ")));
}

async function loadImage(holder, recordId) {
  try {
    const response = await api(`/ui/api/outliers/image?dir=${encodeURIComponent(view.dir)}&id=${encodeURIComponent(recordId)}`);
    const url = URL.createObjectURL(await response.blob());
    shownImages.push(url);
    holder.replaceChildren(el("img", { src: url, alt: recordId }));
  } catch (err) {
    holder.textContent = err.message;
  }
}

function tile(r) {
  const decision = r.kept ? "kept" : "rejected";
  const pic = el("div", { class: r.has_image ? "pic" : "pic none" }, r.has_image ? "loading…" : (r.pool === "pixel" ? "no image: rejected candidates are not saved" : `${r.pool} latent: no image`));
  if (r.has_image) loadImage(pic, r.id);
  return el("div", { class: `tile ${decision}`, "data-id": r.id, "data-kept": String(r.kept), "data-class": String(r.source_class) },
    pic, el("div", { class: "id" }, r.id), el("span", { class: `badge ${decision}` }, decision),
    el("div", { class: "reason" }, r.reason), el("div", { class: "muted" }, `class ${r.source_class}`,
      r.knn_distance === null || r.knn_distance === undefined ? "" : ` · kNN distance ${fmt(r.knn_distance)}`));
}

async function loadPage() {
  byId("page-error").textContent = "";
  const q = new URLSearchParams({ dir: view.dir, kept: view.kept, page: String(view.page), per_page: String(view.per_page) });
  if (view.source_class) q.set("source_class", view.source_class);
  if (view.pool) q.set("pool", view.pool);
  let data;
  try { data = await apiJson(`/ui/api/outliers?${q}`); } catch (err) {
    byId("page-error").textContent = err.message;
    byId("dataset").hidden = true;
    return;
  }
  if (view.pool && !data.pools.includes(view.pool)) { view.pool = ""; return loadPage(); }
  view.page = data.page; view.pages = data.pages;
  writeUrl();
  byId("dataset").hidden = false;
  byId("known").replaceChildren();
  renderSummary(data);
  byId("kept").value = view.kept;
  options(byId("source-class"), data.classes, view.source_class, "all");
  options(byId("pool"), data.pools, view.pool, "all");
  byId("page-info").textContent = `page ${data.page} of ${data.pages} · ${data.total} records`;
  byId("prev").disabled = data.page <= 1;
  byId("next").disabled = data.page >= data.pages;
  shownImages.forEach((url) => URL.revokeObjectURL(url));
  shownImages = [];
  byId("grid").replaceChildren(...data.records.map(tile));
}

function onFilter(key) {
  return (event) => { view[key] = event.target.value; view.page = 1; loadPage(); };
}

function start() {
  readUrl();
  byId("dir").value = view.dir;
  if (view.dir) loadPage(); else showKnown();
}

byId("open-form").addEventListener("submit", (event) => {
  event.preventDefault();
  Object.assign(view, { dir: byId("dir").value.trim(), page: 1 });
  loadPage();
});
byId("kept").addEventListener("change", onFilter("kept"));
byId("source-class").addEventListener("change", onFilter("source_class"));
byId("pool").addEventListener("change", onFilter("pool"));
byId("prev").addEventListener("click", () => { view.page -= 1; loadPage(); });
byId("next").addEventListener("click", () => { view.page += 1; loadPage(); });
setupAuth(start);
start();
