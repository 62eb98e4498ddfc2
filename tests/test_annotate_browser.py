"""End to end in headless Chromium: an admin creates campaigns, two people rank with the keyboard, one undoes.

Uses Debian's /usr/bin/chromium through Playwright (no browser download). Screenshots go to the
test's tmp dir; with ALIGNLOOP_UPDATE_SCREENSHOTS=1 they are also copied to docs/img/.
"""

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from alignloop.annotate import service
from alignloop.annotate.app import BackgroundServer
from alignloop.annotate.db import get_sessionmaker

CHROMIUM = Path(os.environ.get("ALIGNLOOP_CHROMIUM", "/usr/bin/chromium"))
EVIL = '<script>window.__xss = 1</script><b id="bold">not bold</b>'
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")]


def write_campaign(path, items):
    path.write_text("".join(json.dumps({"item_id": i, "prompt": p, "responses": rs, "meta": {"k": len(rs)}}) + "\n"
                            for i, p, rs in items))
    return path


RANK_ITEMS = [
    ("q1", "Tell me about <i>the sea</i>", ["The sea is calm and lovely today.", EVIL, "Waves. Salt. Gulls."]),
    ("q2", "Give advice on mornings", ["Get up early, it is wonderful.", "Mornings are awful.", "Coffee first."]),
    ("q3", "Describe a cat", ["Soft and proud.", "A small tiger.", "Sleeps all day."]),
]
PAIR_ITEMS = [("w1", "Say something kind", ["You did a great job!", "Whatever."])]


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def shown(page):
    return page.locator(".resp .text").all_text_contents()


def answer(page, keys, campaign_items):
    """Press `keys`, then Enter; return (item_id, the ranking in original indices that the keys mean)."""
    prompt, order = page.locator("#prompt").text_content(), shown(page)
    item_id, _, responses = next(it for it in campaign_items if it[1] == prompt)
    to_index = [responses.index(text) for text in order]  # shown position -> response index
    groups, tie = [], False
    for k in keys:
        if k.isdigit():
            (groups[-1].append if tie else lambda p: groups.append([p]))(int(k) - 1)
            tie = False
        elif k == "=":
            tie = True
        elif k == "t":
            groups.append([p for p in range(len(order)) if all(p not in g for g in groups)])
        elif k == "x":
            groups = [list(range(len(order)))]
        page.keyboard.press(k)
    left = [p for p in range(len(order)) if all(p not in g for g in groups)]
    groups += [left] if left else []
    before = page.locator("#status").text_content()
    page.keyboard.press("Enter")
    # Locator assertions, not wait_for_function: our Content-Security-Policy forbids eval, rightly.
    expect(page.locator("#status")).not_to_have_text(before)
    expect(page.locator("#status")).to_have_text(re.compile("^Saved answer"))
    ranking = [sorted(to_index[p] for p in g) for g in groups]
    return item_id, [g[0] if len(g) == 1 else g for g in ranking]


def test_two_people_rank_with_the_keyboard_and_the_export_holds_exactly_their_answers(tmp_path):
    from playwright.sync_api import sync_playwright

    url = f"sqlite:///{tmp_path / 'b.db'}"
    with get_sessionmaker(url)() as s:  # what `alignloop annotate add-annotator` does
        tokens = {n: service.create_annotator(s, n, admin=(n == "admin")) for n in ("admin", "ann", "bob")}
    rank_file = write_campaign(tmp_path / "sampled.jsonl", RANK_ITEMS)
    pair_file = write_campaign(tmp_path / "pairs.jsonl", PAIR_ITEMS)
    shots = tmp_path / "img"
    shots.mkdir()
    expected = []
    with BackgroundServer(url) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        view = {"viewport": {"width": 1200, "height": 760}}
        admin = browser.new_context(**view).new_page()
        admin.goto(f"{base}/admin#token={tokens['admin']}")
        for name, mode, path in (("sampled", "rank", rank_file), ("kind", "pairwise", pair_file)):
            admin.fill("#c-name", name)
            admin.select_option("#c-mode", mode)
            admin.fill("#c-overlap", "2")
            admin.set_input_files("#c-file", str(path))
            admin.click("#c-create")
            admin.wait_for_selector(f"#campaigns td:text-is('{name}')")

        ann = browser.new_context(**view).new_page()
        ann.goto(f"{base}/?c=1#token={tokens['ann']}")
        ann.wait_for_selector(".resp")
        # Model text is shown as text: the script did not run and no <b> element was made.
        assert EVIL in shown(ann) and ann.evaluate("window.__xss") is None and ann.locator("#bold").count() == 0
        assert ann.locator("#prompt").text_content() == RANK_ITEMS[0][1]
        expected.append(("ann",) + answer(ann, ["2", "=", "3"], RANK_ITEMS))  # two tie for best, the last is placed
        answer(ann, ["x"], RANK_ITEMS)  # all bad ... then undone:
        ann.keyboard.press("u")
        expect(ann.locator("#status")).to_have_text(re.compile("^Undid"))
        assert ann.locator("#prompt").text_content() == RANK_ITEMS[1][1]  # the undone item is back
        ann.keyboard.press("w")  # strength: clear
        ann.keyboard.press("r")
        ann.keyboard.type("the first one is kinder")  # keys typed in the reason box are text, not commands
        ann.keyboard.press("Escape")
        expected.append(("ann",) + answer(ann, ["3", "1"], RANK_ITEMS))

        bob = browser.new_context(**view).new_page()
        bob.goto(f"{base}/?c=1#token={tokens['bob']}")
        bob.wait_for_selector(".resp")
        bob.keyboard.press("1")
        bob.keyboard.press("=")
        bob.screenshot(path=str(shots / "annotate-rank.png"))
        bob.keyboard.press("Backspace")
        bob.keyboard.press("Backspace")
        expected.append(("bob",) + answer(bob, ["1", "t"], RANK_ITEMS))
        expected.append(("bob",) + answer(bob, ["x"], RANK_ITEMS))

        ann.goto(f"{base}/?c=2")  # the token stays in this tab's sessionStorage
        ann.wait_for_selector(".responses.pair")
        ann.keyboard.press("1")
        ann.screenshot(path=str(shots / "annotate-pairwise.png"))
        ann.keyboard.press("Backspace")
        expected.append(("ann",) + answer(ann, ["2"], PAIR_ITEMS))
        assert "1 done" in ann.locator("#progress").text_content()

        admin.click("#campaigns tbody tr:first-child .stats-btn")
        admin.wait_for_selector("#people td:text-is('bob')")
        admin.screenshot(path=str(shots / "admin-stats.png"), full_page=True)
        browser.close()

        auth = {"Authorization": f"Bearer {tokens['admin']}"}
        exported = [json.loads(line) for cid in (1, 2) for line in
                    httpx.get(f"{base}/api/admin/campaigns/{cid}/export", headers=auth).text.splitlines()]
    assert sorted((r["annotator"], r["item_id"], r["ranking"]) for r in exported) == sorted(map(tuple, expected))
    bob_all_bad = next(r for r in exported if r["annotator"] == "bob" and r["all_bad"])
    assert bob_all_bad["ranking"] == [[0, 1, 2]] and sum(r["all_bad"] for r in exported) == 1  # ann's was undone
    reasons = [(r["reason"], r["strength"]) for r in exported if r["reason"]]
    assert reasons == [("the first one is kinder", 2)]
    assert all((shots / n).stat().st_size > 10_000 for n in ("annotate-rank.png", "annotate-pairwise.png", "admin-stats.png"))
    if os.environ.get("ALIGNLOOP_UPDATE_SCREENSHOTS"):
        docs = Path(__file__).resolve().parents[1] / "docs" / "img"
        docs.mkdir(parents=True, exist_ok=True)
        for png in shots.iterdir():
            shutil.copy(png, docs / png.name)
