// qbroker dashboard: buttons make documented API calls with the page's token, and the
// page's content refreshes itself. Text from the broker is set with textContent only;
// the refreshed content is HTML the broker rendered and escaped.
"use strict";

const COOKIE = "qbroker_token";
const REFRESH_MS = 3000;

function token() {
  for (const part of document.cookie.split(";")) {
    const [name, ...rest] = part.trim().split("=");
    if (name === COOKIE) return decodeURIComponent(rest.join("="));
  }
  return "";
}

function flash(text, kind) {
  const box = document.getElementById("flash");
  box.textContent = "";
  if (!text) return;
  const div = document.createElement("div");
  div.className = "notice " + (kind || "error");
  div.textContent = text;
  box.appendChild(div);
}

async function call(method, path, body) {
  const headers = { "Accept": "application/json" };
  const t = token();
  if (t) headers["Authorization"] = "Bearer " + t;
  if (body !== undefined && body !== null) headers["Content-Type"] = "application/json";
  let reply;
  try {
    reply = await fetch(path, { method, headers, body: body == null ? undefined : body });
  } catch (err) {
    return { ok: false, status: 0, text: "the broker is unreachable (" + err + ")" };
  }
  let data = null;
  try { data = await reply.json(); } catch (err) { data = null; }
  if (reply.ok) return { ok: true, status: reply.status, data };
  const text = data && data.error
    ? reply.status + " " + data.error + ": " + data.message
    : "HTTP " + reply.status;
  return { ok: false, status: reply.status, text };
}

function summary(data) {
  const s = JSON.stringify(data);
  return s && s.length > 200 ? s.slice(0, 199) + "…" : s;
}

async function act(button) {
  const method = button.dataset.method;
  const path = button.dataset.path;
  const body = button.dataset.body;
  if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
  if (button.dataset.selected) {
    const ids = [...document.querySelectorAll("input.sel:checked")].map((i) => i.value);
    if (!ids.length) { flash("Select jobs first.", "warn"); return; }
    let done = 0;
    const refused = [];
    for (const id of ids) {
      const r = await call(method, path.replace("{id}", encodeURIComponent(id)), body);
      if (r.ok) done += 1; else refused.push(id + ": " + r.text);
    }
    flash(button.textContent + ": " + done + " done" +
          (refused.length ? "; refused: " + refused.join("; ") : ""),
          refused.length ? "error" : "ok");
  } else {
    const r = await call(method, path, body);
    flash(r.ok ? button.textContent + ": " + method + " " + path + " → " + summary(r.data)
               : button.textContent + ": " + r.text, r.ok ? "ok" : "error");
  }
  await refresh(true);
}

async function submitApiForm(form) {
  let path = form.dataset.path;
  const body = {};
  for (const input of form.querySelectorAll("input")) {
    if (!input.value) continue;
    if (path.includes("{" + input.name + "}")) {
      path = path.replace("{" + input.name + "}", encodeURIComponent(input.value));
    } else {
      body[input.name] = input.type === "number" ? Number(input.value) : input.value;
    }
  }
  const r = await call(form.dataset.method, path, JSON.stringify(body));
  flash(r.ok ? form.dataset.method + " " + path + " → " + summary(r.data) : r.text,
        r.ok ? "ok" : "error");
  if (r.ok) form.reset();
  await refresh(true);
}

function busy() {
  if (document.querySelector("input.sel:checked")) return true;
  const el = document.activeElement;
  return !!(el && el.closest("#content") && /^(INPUT|SELECT|TEXTAREA)$/.test(el.tagName));
}

async function refresh(force) {
  const live = document.getElementById("live");
  if (!force && (document.hidden || (live && !live.checked) || busy())) return;
  let reply;
  try {
    reply = await fetch(location.href, { headers: { "X-QBroker-Partial": "1" } });
  } catch (err) {
    flash("The broker is unreachable; retrying.", "warn");
    return;
  }
  if (reply.status === 401) { location.reload(); return; }
  const content = document.getElementById("content");
  const open = [...content.querySelectorAll("details")].map((d) => d.open);
  content.innerHTML = await reply.text();
  content.querySelectorAll("details").forEach((d, i) => { if (open[i]) d.open = true; });
  document.body.dataset.refreshed = String(Date.now());
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button.act");
  if (button) { event.preventDefault(); act(button); }
});

document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form.id === "login") {
    event.preventDefault();
    const value = form.querySelector("input[name=token]").value;
    document.cookie = COOKIE + "=" + encodeURIComponent(value) + "; path=/; SameSite=Strict";
    location.reload();
  } else if (form.classList.contains("api-form")) {
    event.preventDefault();
    submitApiForm(form);
  }
});

document.addEventListener("DOMContentLoaded", () => {
  const out = document.getElementById("signout");
  if (out && token()) {
    out.hidden = false;
    out.addEventListener("click", () => {
      document.cookie = COOKIE + "=; path=/; max-age=0; SameSite=Strict";
      location.reload();
    });
  }
  setInterval(() => { refresh(false); }, REFRESH_MS);
});
