// The annotator's page. One keyboard grammar for pairwise (K = 2) and rank-K, ties and "all bad".
// The order is built best first as groups of shown positions: [[1, 3], 0, 2] means 2 and 4 tie for best.
"use strict";
const state = { campaign: null, view: null, placed: [], tieNext: false, allBad: false, strength: null, busy: false };

function positionsLeft() {
  const used = new Set(state.placed.flat());
  return state.view.responses.map((_, p) => p).filter((p) => !used.has(p));
}

function place(pos) {
  if (state.allBad || pos >= state.view.responses.length || state.placed.flat().includes(pos)) return;
  if (state.tieNext && state.placed.length) state.placed[state.placed.length - 1].push(pos);
  else state.placed.push([pos]);
  state.tieNext = false;
  render();
}

function takeBack() {
  if (state.allBad) { state.allBad = false; state.placed = []; }
  else if (state.tieNext) state.tieNext = false;
  else if (state.placed.length) {
    const last = state.placed[state.placed.length - 1];
    last.pop();
    if (!last.length) state.placed.pop();
  }
  render();
}

function rankingText() {
  if (state.allBad) return "all bad";
  if (!state.placed.length) return state.tieNext ? "=" : "—";
  return state.placed.map((g) => g.map((p) => p + 1).join(" = ")).join(" > ") + (state.tieNext ? " =" : "");
}

function render() {
  document.getElementById("ranking").textContent = rankingText();
  document.getElementById("strength").textContent = state.strength ? ["slight", "clear", "strong"][state.strength - 1] : "–";
  const placeOf = {};
  state.placed.forEach((g, n) => g.forEach((p) => { placeOf[p] = (g.length > 1 ? "tied " : "") + "#" + (n + 1); }));
  document.querySelectorAll(".resp").forEach((card) => {
    const p = Number(card.dataset.pos);
    card.classList.toggle("placed", p in placeOf);
    card.classList.toggle("bad", state.allBad);
    card.querySelector(".place").textContent = state.allBad ? "bad" : (placeOf[p] || "");
    card.querySelector(".place").classList.toggle("hidden", !state.allBad && !(p in placeOf));
  });
}

function setProgress(pr) {
  document.getElementById("progress").textContent = pr.done + " done · " + pr.left + " left";
}

function showItem(view) {
  state.view = view; state.placed = []; state.tieNext = false; state.allBad = false; state.strength = null;
  document.getElementById("reason").value = "";
  if (!view) {
    show("task", false); show("done", true);
    document.getElementById("done-text").textContent = "Nothing left for you in this campaign. Thank you!";
    return;
  }
  show("done", false); show("task", true);
  document.getElementById("prompt").textContent = view.prompt;
  const box = document.getElementById("responses");
  box.replaceChildren();
  box.classList.toggle("pair", view.responses.length === 2);
  view.responses.forEach((text, p) => {
    const card = el("div", undefined, "resp");
    card.dataset.pos = p;
    card.append(el("span", String(p + 1), "label"), el("span", text, "text"), el("span", "", "place hidden"));
    card.onclick = () => place(p);
    box.append(card);
  });
  setProgress(view.progress);
  render();
}

async function loadNext() {
  try { showItem(await api("GET", `/api/campaigns/${state.campaign.id}/next`)); }
  catch (e) { setStatus(e.message, true); }
}

async function act(fn) {
  if (state.busy) return;  // one request at a time: a double Enter cannot send an answer twice
  state.busy = true;
  try { await fn(); } catch (e) { setStatus(e.message, true); } finally { state.busy = false; }
}

function submit() {
  return act(async () => {
    if (!state.view) return;
    let ranking = state.placed.map((g) => (g.length === 1 ? g[0] : g.slice()));
    const left = positionsLeft();
    if (!state.allBad && left.length === 1) ranking.push(left[0]);
    else if (!state.allBad && left.length > 1) { setStatus(`Place ${left.length} more responses (or t to tie the rest)`, true); return; }
    const body = { item: state.view.item, ranking: state.allBad ? [] : ranking, all_bad: state.allBad };
    if (state.strength) body.strength = state.strength;
    const reason = document.getElementById("reason").value.trim();
    if (reason) body.reason = reason;
    const r = await api("POST", `/api/campaigns/${state.campaign.id}/answers`, body);
    setProgress({ done: r.done, left: 0 });  // shown when nothing is left; the next item brings the real count
    await loadNext();
    setStatus(`Saved answer ${r.answer}.`);  // after the next item is on screen
  });
}

const skip = () => act(async () => {
  if (!state.view) return;
  await api("POST", `/api/campaigns/${state.campaign.id}/skip`, { item: state.view.item });
  await loadNext();
  setStatus("Skipped.");
});

const undo = () => act(async () => {
  const r = await api("POST", `/api/campaigns/${state.campaign.id}/undo`);
  await loadNext();
  setStatus(`Undid answer ${r.undone}; here is that item again.`);
});

function onKey(ev) {
  if (!state.view && ev.key !== "u") return;
  const reason = document.getElementById("reason");
  if (document.activeElement === reason) {
    if (ev.key === "Escape") reason.blur();
    return;  // typing a reason: keys are text
  }
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const k = ev.key;
  if (/^[1-9]$/.test(k)) place(Number(k) - 1);
  else if (k === "=") { if (state.placed.length) { state.tieNext = true; render(); } }
  else if (k === "t") { const left = positionsLeft(); if (left.length && !state.allBad) { state.placed.push(left); state.tieNext = false; render(); } }
  else if (k === "x") { state.allBad = true; state.placed = [state.view.responses.map((_, p) => p)]; render(); }
  else if (k === "Backspace") takeBack();
  else if (k === "q" || k === "w" || k === "e") { const v = { q: 1, w: 2, e: 3 }[k]; state.strength = state.strength === v ? null : v; render(); }
  else if (k === "r") { reason.focus(); }
  else if (k === "Enter") submit();
  else if (k === "s") skip();
  else if (k === "u") undo();
  else return;
  ev.preventDefault();
}

async function chooseCampaign(c) {
  state.campaign = c;
  show("campaigns", false);
  document.getElementById("campaign-name").textContent = c.name + " (" + c.mode + ")";
  history.replaceState(null, "", "?c=" + c.id);
  await loadNext();
}

signIn(async () => {
  const list = await api("GET", "/api/campaigns");
  const wanted = Number(new URLSearchParams(location.search).get("c"));
  const pick = list.find((c) => c.id === wanted) || (list.length === 1 ? list[0] : null);
  document.getElementById("submit-btn").onclick = submit;
  document.getElementById("skip-btn").onclick = skip;
  document.getElementById("undo-btn").onclick = undo;
  document.addEventListener("keydown", onKey);
  if (pick) return chooseCampaign(pick);
  const ul = document.getElementById("campaign-list");
  ul.replaceChildren();
  list.forEach((c) => {
    const li = el("li");
    const b = el("button", c.name, "campaign");
    b.onclick = () => chooseCampaign(c);
    li.append(b, el("span", ` ${c.mode}, ${c.progress.done} done, ${c.progress.left} left`));
    ul.append(li);
  });
  show("campaigns", true);
  if (!list.length) setStatus("No campaigns yet.");
});
