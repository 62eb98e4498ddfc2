"""Compare two pipeline report.json files: are all their non-timing figures identical?

    python scripts/compare_reports.py BEFORE/report.json AFTER/report.json

Prints every figure that differs (timings, load averages and fingerprints are skipped), then
the config leaves that differ, which are not figures. Exits 1 when a figure differs.
"""
import json, sys

TIMING = ("seconds", "per_second", "stage_times", "load_", "finished", "written", "fingerprint", "train_seconds")

def leaves(x, path=()):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, path + (str(k),))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, path + (str(i),))
    else:
        yield path, x

a, b = (json.load(open(f)) for f in sys.argv[1:3])
la = {p: v for p, v in leaves(a) if not any(t in "/".join(p) for t in TIMING)}
lb = {p: v for p, v in leaves(b) if not any(t in "/".join(p) for t in TIMING)}
figures = lambda d: {p: v for p, v in d.items() if p[0] not in ("configs", "run")}
fa, fb = figures(la), figures(lb)
numeric = [p for p in fa if isinstance(fa[p], (int, float)) and not isinstance(fa[p], bool)]
diff = [p for p in set(fa) | set(fb) if fa.get(p, "<missing>") != fb.get(p, "<missing>")]
print(f"figures compared: {len(fa)} leaves ({len(numeric)} numbers) in before, {len(fb)} in after")
for p in sorted(diff):
    print("DIFF", "/".join(p), fa.get(p, "<missing>"), "->", fb.get(p, "<missing>"))
print("identical" if not diff else f"{len(diff)} differ")
exit_code = 1 if diff else 0
ca = {p: v for p, v in la.items() if p[0] == "configs"}
cb = {p: v for p, v in lb.items() if p[0] == "configs"}
cd = [p for p in set(ca) | set(cb) if ca.get(p, "<missing>") != cb.get(p, "<missing>")]
print(f"config leaves that differ (not figures): {len(cd)}")
for p in sorted(cd)[:60]:
    print("  CFG", "/".join(p), ca.get(p, "<missing>"), "->", cb.get(p, "<missing>"))
sys.exit(exit_code)
