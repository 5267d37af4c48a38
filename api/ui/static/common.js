// oodforge /ui: what both pages share: API calls with the bearer key, error messages, small DOM helpers.
"use strict";

const KEY_STORE = "oodforge-api-key";

function apiKey() { return sessionStorage.getItem(KEY_STORE) || ""; }

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The server's message from an error response: {"detail": "..."} (or FastAPI's list of problems).
async function errorText(response) {
  const raw = await response.text();
  try {
    const detail = JSON.parse(raw).detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  } catch (err) { /* not JSON: show the text */ }
  return raw.slice(0, 500) || response.statusText;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// fetch() with the API key; a 4xx/5xx becomes an ApiError carrying the server's message.
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!response.ok) {
    const message = await errorText(response);
    if (response.status === 401) askForKey(message);
    throw new ApiError(response.status, message);
  }
  return response;
}

async function apiJson(path, options) { return (await api(path, options)).json(); }

function askForKey(message) {
  const box = document.getElementById("auth");
  box.classList.add("shown");
  document.getElementById("auth-message").textContent = message;
}

function setupAuth(onKey) {
  const form = document.getElementById("auth-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, document.getElementById("auth-key").value.trim());
    document.getElementById("auth").classList.remove("shown");
    onKey();
  });
}

// el("div", {class: "x"}, "text", child) -> an element; attributes starting with "on" are listeners.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmt(value) {
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  return Math.abs(value) >= 1e4 || (value !== 0 && Math.abs(value) < 1e-3) ? value.toExponential(3) : value.toPrecision(4);
}
