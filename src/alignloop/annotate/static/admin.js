// The admin page: create campaigns, watch quality while people work, export.
"use strict";
let current = null;

const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + " %");
const num = (x, d = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));

function row(cells) {
  const tr = el("tr");
  cells.forEach((c) => tr.append(c instanceof Node ? (() => { const td = el("td"); td.append(c); return td; })() : el("td", c)));
  return tr;
}

async function loadCampaigns() {
  const list = await api("GET", "/api/campaigns");
  const body = document.querySelector("#campaigns tbody");
  body.replaceChildren();
  list.forEach((c) => {
    const overlap = el("input");
    overlap.type = "number"; overlap.min = 1; overlap.max = 100; overlap.value = c.overlap; overlap.style.width = "4em";
    overlap.onchange = async () => {
      try { await api("PATCH", `/api/admin/campaigns/${c.id}`, { overlap: Number(overlap.value) }); setStatus(`Campaign ${c.id}: ${overlap.value} annotators per item.`); }
      catch (e) { setStatus(e.message, true); }
    };
    const btn = el("button", "stats");
    btn.className = "stats-btn";
    btn.onclick = () => showStats(c.id);
    body.append(row([String(c.id), c.name, c.mode, String(c.items), overlap, btn]));
  });
}

async function showStats(id) {
  current = id;
  const s = await api("GET", `/api/admin/campaigns/${id}/stats`);
  document.getElementById("stats-title").textContent = `${s.name}: ${s.answers} answers`;
  const fig = document.querySelector("#figures tbody");
  fig.replaceChildren(
    row(["items complete", `${s.items_complete} / ${s.items}`]),
    row(["answers (all bad)", `${s.answers} (${s.all_bad})`]),
    row(["pairwise agreement", pct(s.agreement.pairwise) + ` over ${s.agreement.pairs_compared} pair verdicts`]),
    row(["Kendall tau-b (mean)", num(s.agreement.tau_b)]),
    row(["Krippendorff alpha (ordinal)", num(s.agreement.alpha)]),
    row(["first shown ranked best", pct(s.position_bias.first_shown_best) + " (chance " + pct(s.position_bias.chance) + ")"]),
  );
  const people = document.querySelector("#people tbody");
  people.replaceChildren();
  Object.entries(s.annotators).forEach(([name, p]) => people.append(row([
    name, String(p.answers), String(p.skips), num(p.median_seconds, 1), String(p.too_fast),
    pct(p.agreement_with_others), pct(p.agreement_with_consensus), pct(p.gold_agreement)])));
  show("stats", true);
}

async function download(kind) {
  const r = await fetch(`/api/admin/campaigns/${current}/export?kind=${kind}`,
    { headers: { Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) } });
  if (!r.ok) { setStatus(`export failed: ${r.status}`, true); return; }
  const a = document.getElementById("download");
  a.href = URL.createObjectURL(await r.blob());
  a.download = `campaign${current}-${kind}.jsonl`;
  a.click();
}

async function createCampaign() {
  const file = document.getElementById("c-file").files[0];
  if (!file) { setStatus("Choose a campaign file.", true); return; }
  const items = [];
  const lines = (await file.text()).split("\n");
  for (let i = 0; i < lines.length; i++) {
    if (!lines[i].trim()) continue;
    try { items.push({ ...JSON.parse(lines[i]), _line: i + 1 }); }
    catch (e) { setStatus(`${file.name}:${i + 1}: not valid JSON`, true); return; }
  }
  const body = { name: document.getElementById("c-name").value.trim() || file.name, mode: document.getElementById("c-mode").value,
    overlap: Number(document.getElementById("c-overlap").value), items };
  try {
    const c = await api("POST", "/api/admin/campaigns", body);
    setStatus(`Created campaign ${c.id} (${items.length} items).`);
    await loadCampaigns();
  } catch (e) { setStatus(e.message, true); }
}

signIn(async (me) => {
  if (!me.admin) { setStatus("This page is for admins.", true); return; }
  show("admin", true);
  document.getElementById("c-create").onclick = createCampaign;
  document.getElementById("export-rankings").onclick = () => download("rankings");
  document.getElementById("export-pairs").onclick = () => download("pairs");
  document.getElementById("a-create").onclick = async () => {
    try {
      const r = await api("POST", "/api/admin/annotators", { name: document.getElementById("a-name").value, admin: document.getElementById("a-admin").checked });
      document.getElementById("a-token").textContent = `${r.name}: ${r.token}`;
    } catch (e) { setStatus(e.message, true); }
  };
  await loadCampaigns();
});
