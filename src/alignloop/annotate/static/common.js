// Shared by both pages: the token lives in sessionStorage and goes in the Authorization header.
"use strict";
const TOKEN_KEY = "alignloop-token";

function takeTokenFromHash() {
  // A link like /#token=... signs in once; the token is removed from the address bar at once.
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

async function api(method, path, body) {
  const opts = { method, headers: { Authorization: "Bearer " + (sessionStorage.getItem(TOKEN_KEY) || "") } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (!r.ok) {
    const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : r.statusText;
    const err = new Error(r.status + ": " + detail);
    err.status = r.status;
    throw err;
  }
  return data;
}

function el(tag, text, cls) {
  // Every piece of model, prompt or user text reaches the page through textContent: never parsed as HTML.
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function setStatus(text, isError) {
  const s = document.getElementById("status");
  s.textContent = text || "";
  s.classList.toggle("error", !!isError);
}

function show(id, on) { document.getElementById(id).classList.toggle("hidden", !on); }

async function signIn(onReady) {
  takeTokenFromHash();
  document.getElementById("signin-btn").onclick = async () => {
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
    signIn(onReady);
  };
  document.getElementById("token").onkeydown = (ev) => { if (ev.key === "Enter") document.getElementById("signin-btn").click(); };
  if (!sessionStorage.getItem(TOKEN_KEY)) { show("signin", true); return; }
  try {
    const me = await api("GET", "/api/me");
    show("signin", false);
    document.getElementById("who").textContent = me.name;
    setStatus("");
    onReady(me);
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    show("signin", true);
    setStatus("Sign-in failed: " + e.message, true);
  }
}
