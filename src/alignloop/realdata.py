"""Real people's judgments and real prompts, fetched from package registries at run time.

Human sentiment ratings (Hutto & Gilbert, ICWSM 2014; shipped in the source
archive of `vaderSentiment` 3.3.2 on PyPI, MIT): about 23,700 sentences in four
domains, each rated −4..+4 by 15–99 people, with every individual rating. We
turn them into preference pairs in our format, `{"prompt", "chosen", "rejected"}`:
two sentences of the same domain, chosen = the one people rated more positive.

- **majority** label: chosen has the higher mean rating (the crowd's verdict).
- **sampled-vote** label: one simulated person, whose rating of each sentence
  is one of that sentence's real ratings drawn at random, picks the higher one
  (a tie in their two ratings is a coin flip). This carries the real
  disagreement between people into the training labels.

The held-out split is by sentence text (no sentence, nor a verbatim duplicate,
is in both splits), per domain; held-out pairs are always labelled by the
majority, since that is what agreement is measured against.

The prompt of a pair is a fixed instruction per domain (`DOMAIN_PROMPTS`): a
reward model then reads "write a tweet" + the tweet, the same shape as a
policy's prompt + response, and pairs from different domains never share a prompt.

Prompts from `chatterbot-corpus` (PyPI, BSD): the hand-written English
conversations, each consecutive pair of turns a `{"prompt", "response"}`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import io
import math
import random
import re
import statistics
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import StageConfig
from .errors import AlignloopError, InputError
from .files import atomic_write_json
from .jsonl import decode_utf8, read_jsonl, read_text, write_jsonl
from .splits import shuffled_split, split_items
from .stage import RoundState, StageContext, run_stage

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"

# file stem in the archive -> our domain name
DOMAIN_FILES = {
    "tweets": "tweets",
    "movieReviewSnippets": "movie_reviews",
    "nytEditorialSnippets": "nyt_editorials",
    "amazonReviewSnippets": "amazon_reviews",
}
DOMAIN_PROMPTS = {
    "tweets": "Write a tweet.",
    "movie_reviews": "Write a sentence from a movie review.",
    "nyt_editorials": "Write a sentence from a newspaper editorial.",
    "amazon_reviews": "Write a sentence from a product review.",
}
# Policy prompts made from the data: the domain's kind of text, about a topic its sentences talk about.
TOPIC_PROMPTS = {
    "tweets": "Write a tweet about {topic}.",
    "movie_reviews": "Write a sentence from a movie review about {topic}.",
    "nyt_editorials": "Write a sentence from a newspaper editorial about {topic}.",
    "amazon_reviews": "Write a sentence from a product review about {topic}.",
}
# Words that are never a topic: English function words and verbs of no subject matter.
NOT_TOPICS = frozenset("""
about above after again against also although always among another anyone anything around because been before
being below between both cannot could does doing done down during each either else enough even ever every
from further getting going gonna have having here hers herself himself into itself just know last least less
like little made make makes making many maybe might more most much must myself near need never next none nothing
often once only other others ought ours ourselves over own quite rather really said same says seem seems shall
should since some something still such sure take than that their theirs them themselves then there these they
thing things think this those though through thus together took toward under until upon very want wants was
wasn were weren what whatever when where whether which while whom whose will with within without would year
years yet your yours yourself yourselves goes went come comes came gets got give gives gave keep look looks
lots thats dont didnt doesnt isnt cant wont youre theyre http https www html didn doesn isn wasn couldn wouldn
first second third back long short small large real young right left wait tell check feel found works work
already almost enough away ahead everyone everything someone anyway today tonight tomorrow yesterday however
able different find read despite sometimes takes haven mean thought three four five half whole full high seen
self sense start soon hear send remember call follow part point name feels sounds anonymous
""".split())
RATING_MIN, RATING_MAX = -4, 4
MEAN_TOLERANCE = 1e-3  # the files print means to 9+ digits; anything further off is a different number


@dataclass
class Sentence:
    domain: str
    id: str
    text: str
    ratings: list[int]  # every individual person's rating, -4..+4

    @property
    def mean(self) -> float:
        return statistics.fmean(self.ratings)


# -- fetching ---------------------------------------------------------------
def fetch_vader_sdist(cache_dir: str | Path) -> Path:
    """vaderSentiment 3.3.2's source archive, downloaded by pip into `cache_dir` once."""
    cache_dir = Path(cache_dir)
    target = cache_dir / VADER_SDIST
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "vadersentiment==3.3.2", "-d", str(cache_dir), "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not target.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise AlignloopError(f"could not fetch vaderSentiment 3.3.2's source archive with pip ({last}); "
                             f"download {VADER_SDIST} yourself and pass --archive FILE")
    return target


def _inner_archive_bytes(path: Path) -> bytes:
    """The ratings archive: `path` itself, or the copy inside vaderSentiment's source archive."""
    try:
        with tarfile.open(path) as outer:
            names = outer.getnames()
            inner = [n for n in names if n.endswith(INNER_ARCHIVE)]
            if inner:
                return outer.extractfile(inner[0]).read()
            if any(n.endswith("_anonDataRatings.txt") for n in names):
                return path.read_bytes()
    except (tarfile.TarError, EOFError, OSError) as e:  # EOFError: a gzip stream cut short
        raise InputError(path, f"not a readable tar archive ({e})") from None
    raise InputError(path, f"holds neither {INNER_ARCHIVE} nor *_anonDataRatings.txt files")


# -- parsing ------------------------------------------------------------------
def _lines(data: bytes, where: str) -> list[tuple[int, list[str]]]:
    """(1-based line, tab-separated fields) of each non-blank line; a BOM and CRLFs are tolerated."""
    text = decode_utf8(data, where)
    return [(i, ln.rstrip("\r").split("\t")) for i, ln in enumerate(text.split("\n"), start=1) if ln.strip()]


def _float(where: str, line: int, field: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise InputError(where, f"expected a number, got {raw!r}", line=line, field=field) from None
    if not math.isfinite(value):
        raise InputError(where, f"expected a finite number, got {raw!r}", line=line, field=field)
    return value


def parse_ratings_file(data: bytes, where: str) -> dict[str, tuple[int, float, list[int]]]:
    """`ID  MEAN  SD  [r1, r2, ...]` per line -> {id: (line, mean, ratings)}."""
    out = {}
    for line, fields in _lines(data, where):
        if len(fields) != 4:
            raise InputError(where, f"expected 4 tab-separated fields (id, mean, sd, ratings), got {len(fields)}", line=line)
        sid, mean_raw, sd_raw, ratings_raw = (f.strip() for f in fields)
        if not sid:
            raise InputError(where, "empty", line=line, field="id")
        if sid in out:
            raise InputError(where, f"id {sid!r} already on line {out[sid][0]}", line=line, field="id")
        mean = _float(where, line, "mean", mean_raw)
        _float(where, line, "sd", sd_raw)
        try:
            ratings = ast.literal_eval(ratings_raw)
        # literal_eval also raises TypeError ({[]: 1}), MemoryError and RecursionError (deep nesting)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise InputError(where, f"expected a list like [1, -2, 0], got {ratings_raw[:40]!r}", line=line, field="ratings") from None
        if not isinstance(ratings, list) or not ratings:
            raise InputError(where, "expected a non-empty list of ratings", line=line, field="ratings")
        for r in ratings:
            if isinstance(r, bool) or not isinstance(r, int) or not RATING_MIN <= r <= RATING_MAX:
                raise InputError(where, f"rating {r!r} is not an integer in {RATING_MIN}..{RATING_MAX}", line=line, field="ratings")
        if abs(statistics.fmean(ratings) - mean) > MEAN_TOLERANCE:
            raise InputError(where, f"mean {mean} disagrees with the mean of its ratings ({statistics.fmean(ratings):.4f})",
                             line=line, field="mean")
        out[sid] = (line, mean, ratings)
    return out


def parse_text_file(data: bytes, where: str) -> dict[str, tuple[int, float, str]]:
    """`ID  MEAN  TEXT` per line -> {id: (line, mean, text)}."""
    out = {}
    for line, fields in _lines(data, where):
        if len(fields) < 3:
            raise InputError(where, f"expected 3 tab-separated fields (id, mean, text), got {len(fields)}", line=line)
        sid, mean_raw, text = fields[0].strip(), fields[1].strip(), "\t".join(fields[2:]).strip()
        if not sid:
            raise InputError(where, "empty", line=line, field="id")
        if sid in out:
            raise InputError(where, f"id {sid!r} already on line {out[sid][0]}", line=line, field="id")
        if not text:
            raise InputError(where, "empty", line=line, field="text")
        out[sid] = (line, _float(where, line, "mean", mean_raw), text)
    return out


def read_human_ratings(archive: str | Path) -> tuple[list[Sentence], dict[str, int]]:
    """Every rated sentence of the archive, and per domain how many were dropped as inconsistent.

    The two files of a domain are joined on ID. A sentence whose two files state
    different means is dropped (counted, not an error): for 199 contrived tweets
    of the real archive the text file's mean is not the mean of the ratings
    file's row, so we cannot tell that those ratings belong to that text.
    """
    archive = Path(archive)
    blob = _inner_archive_bytes(archive)
    try:
        return _read_ratings_tar(archive, tarfile.open(fileobj=io.BytesIO(blob)))
    except (tarfile.TarError, EOFError, OSError) as e:  # a damaged inner archive, or a member cut short
        raise InputError(archive, f"the ratings archive inside it is damaged ({e})") from None


def _read_ratings_tar(archive: Path, tar: tarfile.TarFile) -> tuple[list[Sentence], dict[str, int]]:
    with tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        sentences: list[Sentence] = []
        dropped: dict[str, int] = {}
        for stem, domain in DOMAIN_FILES.items():
            files = {}
            for kind in ("anonDataRatings", "GroundTruth"):
                name = f"{stem}_{kind}.txt"
                if name not in members:
                    raise InputError(archive, f"the ratings archive has no {name}")
                files[kind] = (f"{archive}!{members[name].name}", tar.extractfile(members[name]).read())
            where_r, where_t = files["anonDataRatings"][0], files["GroundTruth"][0]
            ratings = parse_ratings_file(files["anonDataRatings"][1], where_r)
            texts = parse_text_file(files["GroundTruth"][1], where_t)
            for sid, (line, _, _) in texts.items():
                if sid not in ratings:
                    raise InputError(where_t, f"id {sid!r} has no row in {Path(where_r).name}", line=line, field="id")
            dropped[domain] = 0
            for sid, (line, mean, votes) in ratings.items():
                if sid not in texts:
                    raise InputError(where_r, f"id {sid!r} has no text in {Path(where_t).name}", line=line, field="id")
                if abs(texts[sid][1] - mean) > MEAN_TOLERANCE:
                    dropped[domain] += 1
                    continue
                sentences.append(Sentence(domain, sid, texts[sid][2], votes))
    return sentences, dropped


# -- splits and pairs ---------------------------------------------------------
def split_by_sentence(sentences: Sequence[Sentence], held_out_fraction: float, seed: int) -> tuple[list[Sentence], list[Sentence]]:
    """(train, held_out) per domain, by sentence text: duplicates of a text land in the same split."""
    train, held = [], []
    for domain in sorted({s.domain for s in sentences}):
        group = [s for s in sentences if s.domain == domain]
        texts = sorted({s.text.strip() for s in group})
        _, held_texts = shuffled_split(texts, held_out_fraction, random.Random(f"{seed}:{domain}"),
                                       count=round(held_out_fraction * len(texts)))
        domain_train, domain_held = split_items(group, lambda s: s.text.strip(), held_texts)
        train += domain_train
        held += domain_held
    return train, held


def vote_share(a: Sequence[int], b: Sequence[int]) -> float:
    """P(a person rates a above b) when both ratings are drawn from the real ones; a tie counts half.

    This is the expected agreement of one sampled person's vote with "a wins".
    """
    wins = sum((x > y) + 0.5 * (x == y) for x in a for y in b)
    return wins / (len(a) * len(b))


def sampled_vote(a: Sequence[int], b: Sequence[int], rng: random.Random) -> int:
    """One simulated person's choice: 0 for a, 1 for b (their two ratings tied: a coin flip)."""
    x, y = rng.choice(a), rng.choice(b)
    if x == y:
        return rng.randrange(2)
    return 0 if x > y else 1


def make_pairs(sentences: Sequence[Sentence], rng: random.Random, pairs_per_sentence: int, min_mean_gap: float,
               label: str) -> list[dict]:
    """Pairs within each domain whose mean ratings differ by at least `min_mean_gap` (and by more than 0).

    Each sentence is paired with `pairs_per_sentence` partners drawn at random
    from its domain (no pair twice). Extra keys keep the evidence: both
    sentences' ids, means and individual votes, the label mode, and whether the
    label agrees with the majority.
    """
    if label not in ("majority", "sampled-vote"):
        raise AlignloopError(f"label must be 'majority' or 'sampled-vote', got {label!r}")
    pairs = []
    for domain in sorted({s.domain for s in sentences}):
        group = [s for s in sentences if s.domain == domain]
        means = [s.mean for s in group]
        seen: set[tuple[int, int]] = set()
        for i in range(len(group)):
            found, tries = 0, 0
            while found < pairs_per_sentence and tries < 50 * pairs_per_sentence:
                tries += 1
                j = rng.randrange(len(group))
                key = (min(i, j), max(i, j))
                gap = abs(means[i] - means[j])
                if j == i or key in seen or gap == 0 or gap < min_mean_gap or group[i].text == group[j].text:
                    continue
                seen.add(key)
                found += 1
                hi, lo = (group[i], group[j]) if means[i] > means[j] else (group[j], group[i])
                chosen, rejected = hi, lo
                if label == "sampled-vote" and sampled_vote(hi.ratings, lo.ratings, rng) == 1:
                    chosen, rejected = lo, hi
                pairs.append({
                    "prompt": DOMAIN_PROMPTS[domain], "chosen": chosen.text, "rejected": rejected.text,
                    "domain": domain, "label": label, "agrees_with_majority": chosen is hi,
                    "chosen_id": chosen.id, "rejected_id": rejected.id,
                    "chosen_mean": round(chosen.mean, 4), "rejected_mean": round(rejected.mean, 4),
                    "mean_gap": round(hi.mean - lo.mean, 4),
                    "majority_vote_share": round(vote_share(hi.ratings, lo.ratings), 4),
                    "chosen_votes": chosen.ratings, "rejected_votes": rejected.ratings,
                })
    return pairs


# -- agreement with the human majority -----------------------------------------
def agreement(pairs: Sequence[dict], scorer: Callable[[Sequence[str], Sequence[str]], list[float]]) -> dict[str, dict]:
    """Per domain (and 'all'): how often `scorer` ranks the majority's choice above the other.

    Pairs must be majority-labelled (chosen = higher human mean). A tie in the
    scorer's two scores counts half (a coin flip); the tie rate is reported too,
    because a lexicon scores many sentences exactly 0.
    """
    prompts = [p["prompt"] for p in pairs]
    # One call for both sides, so a scorer that skips repeated texts sees every repeat at once.
    both = scorer(prompts + prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    chosen, rejected = both[:len(pairs)], both[len(pairs):]
    by_domain: dict[str, list[float]] = {}
    ties: dict[str, int] = {}
    for p, c, r in zip(pairs, chosen, rejected):
        if not p.get("agrees_with_majority", True):
            raise AlignloopError("agreement needs majority-labelled pairs (held_out_pairs.jsonl is)")
        for key in (p.get("domain", "all"), "all"):
            by_domain.setdefault(key, []).append(1.0 if c > r else 0.5 if c == r else 0.0)
            ties[key] = ties.get(key, 0) + (c == r)
    return {d: {"agreement": round(statistics.fmean(v), 4), "tie_rate": round(ties[d] / len(v), 4), "pairs": len(v)}
            for d, v in sorted(by_domain.items(), key=lambda kv: (kv[0] == "all", kv[0]))}


def one_person_agreement(pairs: Sequence[dict]) -> dict[str, dict]:
    """Per domain: expected agreement of one random person's vote with the majority (the human ceiling)."""
    by_domain: dict[str, list[float]] = {}
    for p in pairs:
        for key in (p.get("domain", "all"), "all"):
            by_domain.setdefault(key, []).append(p["majority_vote_share"])
    return {d: {"agreement": round(statistics.fmean(v), 4), "pairs": len(v)}
            for d, v in sorted(by_domain.items(), key=lambda kv: (kv[0] == "all", kv[0]))}


def agreement_table(pairs_path: str | Path, scorers: Sequence[str] = ("vader", "afinn"),
                    reward_models: Sequence[str | Path] = ()) -> dict[str, dict]:
    """{column: {domain: {...}}} for label functions, reward model directories and one random person."""
    from .labelers import load_label_function

    pairs = read_jsonl(pairs_path, {"prompt": str, "chosen": str, "rejected": str, "majority_vote_share": (int, float)})
    table = {"one_person": one_person_agreement(pairs)}
    for spec in scorers:
        table[spec] = agreement(pairs, load_label_function(spec))
    for rm_dir in reward_models:
        from .device import choose_precision, resolve_device
        from .reward.model import RewardModel

        device = resolve_device("auto")
        rm = RewardModel.from_pretrained(rm_dir, device, choose_precision(device, "auto"))
        table[str(rm_dir)] = agreement(pairs, lambda ps, rs: rm.score(list(ps), list(rs), normalize=False))
    return table


def format_agreement_table(table: dict[str, dict]) -> str:
    """A Markdown table: one row per domain, one column per scorer."""
    columns = list(table)
    domains = list(next(iter(table.values())))
    lines = ["| domain | held-out pairs | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for d in domains:
        cells = [f"{100 * table[c][d]['agreement']:.1f} %" if d in table[c] else "–" for c in columns]
        lines.append(f"| {d} | {table[columns[0]][d]['pairs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def subsample_pairs(pairs_path: str | Path, out_path: str | Path, per_domain: int, seed: int = 0) -> dict[str, int]:
    """At most `per_domain` pairs of each domain, drawn at random: for backbones too slow for all of them."""
    pairs = read_jsonl(pairs_path)
    rng = random.Random(seed)
    kept = []
    for domain in sorted({p.get("domain", "") for p in pairs}):
        group = [p for p in pairs if p.get("domain", "") == domain]
        kept += rng.sample(group, min(per_domain, len(group)))
    rng.shuffle(kept)
    write_jsonl(out_path, kept)
    return {d: sum(p.get("domain", "") == d for p in kept) for d in sorted({p.get("domain", "") for p in kept})}


# -- the stage -----------------------------------------------------------------
@dataclasses.dataclass
class HumanSentimentConfig(StageConfig):
    out_dir: Path = Path("runs/human_sentiment")
    archive: Path | None = None  # vaderSentiment-3.3.2.tar.gz or hutto_ICWSM_2014.tar.gz; None: fetch with pip
    cache_dir: Path | None = None  # where pip puts the download; None: out_dir/cache
    label: str = "majority"  # training pairs: 'majority' or 'sampled-vote'
    held_out_fraction: float = 0.1
    gold_fraction: float = 0.0  # of the training sentences: set aside for a gold RM (gold_train_pairs.jsonl)
    topics_per_domain: int = 0  # > 0: also write policy prompts, this many topics per domain (topic_prompts)
    prompts_dir: Path | None = None  # where the policy prompts go (train/, held_out/); None: out_dir
    pairs_per_sentence: int = 2
    held_out_pairs_per_sentence: int = 2
    min_mean_gap: float = 0.5  # on the -4..+4 scale; closer sentences are not paired
    seed: int = 0
    scorers: list[str] = dataclasses.field(default_factory=lambda: ["vader", "afinn"])  # agreement columns

    def validate(self) -> None:
        self.require(self.label in ("majority", "sampled-vote"), f"label must be 'majority' or 'sampled-vote', got {self.label!r}")
        self.require(0 < self.held_out_fraction < 1, "held_out_fraction must be in (0, 1)")
        self.require(0 <= self.gold_fraction < 1, "gold_fraction must be in [0, 1) (0: no gold split)")
        self.require(self.topics_per_domain >= 0, "topics_per_domain must be >= 0 (0: no policy prompts)")
        self.require(self.pairs_per_sentence >= 1 and self.held_out_pairs_per_sentence >= 1, "pairs per sentence must be >= 1")
        self.require(0 <= self.min_mean_gap < RATING_MAX - RATING_MIN, "min_mean_gap must be in [0, 8)")
        if self.archive is not None and not Path(self.archive).is_file():
            raise InputError(self.archive, "no such archive")


def human_sentiment(config: HumanSentimentConfig, ctx: StageContext | None = None) -> dict:
    """Fetch (or read) the ratings, split by sentence, write pairs and the lexicons' agreement with the majority.

    Writes `train_pairs.jsonl` (label mode as configured), `held_out_pairs.jsonl`
    (majority), one `held_out_pairs.<domain>.jsonl` per domain, `sentences.jsonl`
    (every kept sentence with its split and votes) and `agreement.json`. With `gold_fraction`,
    that share of the training sentences is split off (by text, per domain, as the held-out
    split is) into `gold_train_pairs.jsonl` (majority labels): a gold reward model trained on
    them shares no sentence with the proxy reward model that the policy is trained against.
    With `topics_per_domain`, it also writes policy prompts (`topic_prompts`).
    """
    return run_stage(HUMAN_SENTIMENT, config, ctx)


def write_human_sentiment(config: HumanSentimentConfig) -> dict:
    out = Path(config.out_dir)
    archive = config.archive or fetch_vader_sdist(config.cache_dir or out / "cache")
    sentences, dropped = read_human_ratings(archive)
    train, held = split_by_sentence(sentences, config.held_out_fraction, config.seed)
    gold: list[Sentence] = []
    if config.gold_fraction:
        train, gold = split_by_sentence(train, config.gold_fraction, config.seed + 1)
    # Separate generators: the held-out pairs are the same whatever the training label mode.
    train_pairs = make_pairs(train, random.Random(f"{config.seed}:train"), config.pairs_per_sentence,
                             config.min_mean_gap, config.label)
    held_pairs = make_pairs(held, random.Random(f"{config.seed}:held_out"), config.held_out_pairs_per_sentence,
                            config.min_mean_gap, "majority")
    write_jsonl(out / "train_pairs.jsonl", train_pairs)
    gold_pairs = make_pairs(gold, random.Random(f"{config.seed}:gold"), config.pairs_per_sentence,
                            config.min_mean_gap, "majority")
    if config.gold_fraction:
        write_jsonl(out / "gold_train_pairs.jsonl", gold_pairs)
    write_jsonl(out / "held_out_pairs.jsonl", held_pairs)
    domains = sorted({s.domain for s in sentences})
    for d in domains:
        write_jsonl(out / f"held_out_pairs.{d}.jsonl", (p for p in held_pairs if p["domain"] == d))
    if not train_pairs or not held_pairs:
        raise AlignloopError(f"{len(train_pairs)} training and {len(held_pairs)} held-out pairs: too few sentences "
                             f"for held_out_fraction={config.held_out_fraction} and min_mean_gap={config.min_mean_gap}")
    split_of = {**{(s.domain, s.id): "held_out" for s in held}, **{(s.domain, s.id): "gold" for s in gold}}
    write_jsonl(out / "sentences.jsonl", ({"domain": s.domain, "id": s.id, "text": s.text, "mean": round(s.mean, 4),
                                          "split": split_of.get((s.domain, s.id), "train"),
                                          "votes": s.ratings} for s in sentences))
    table = agreement_table(out / "held_out_pairs.jsonl", config.scorers)
    atomic_write_json(out / "agreement.json", table)
    prompts = {}
    if config.topics_per_domain:
        train_prompts, held_prompts = topic_prompts(sentences, config.topics_per_domain, config.held_out_fraction,
                                                    config.seed)
        prompts = write_prompt_split(Path(config.prompts_dir or out), "human_sentiment", train_prompts, held_prompts)
    summary = {
        "out_dir": str(out), "archive": str(archive),
        "sentences": {d: sum(s.domain == d for s in sentences) for d in domains},
        "dropped_inconsistent": dropped,
        "train_pairs": len(train_pairs), "held_out_pairs": len(held_pairs), "gold_train_pairs": len(gold_pairs),
        "train_label": config.label,
        "train_labels_agreeing_with_majority": round(statistics.fmean(p["agrees_with_majority"] for p in train_pairs), 4),
        "held_out_agreement": {c: table[c]["all"]["agreement"] for c in table},
        "prompts": prompts,
    }
    return summary


@functools.lru_cache(maxsize=1)
def sentiment_words() -> frozenset[str]:
    """Every word VADER's lexicon scores: a sentiment word is what a topic must not be."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return frozenset(SentimentIntensityAnalyzer().lexicon)


def topic_prompts(sentences: Sequence[Sentence], per_domain: int, held_out_fraction: float,
                  seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) policy prompts: per domain, its `per_domain` commonest topic words (in how
    many of its sentences they appear; words of 4+ letters that are neither function words nor
    sentiment words), each put in the domain's `TOPIC_PROMPTS` instruction; split by topic, so a
    held-out prompt's topic is in no training prompt of that domain."""
    train, held = [], []
    lexicon = sentiment_words()
    for domain in sorted({s.domain for s in sentences}):
        counts: dict[str, int] = {}
        for s in sentences:
            if s.domain == domain:
                for word in {w for w in re.findall(r"[a-z]+", s.text.lower()) if len(w) >= 4}:
                    counts[word] = counts.get(word, 0) + 1
        # Verb forms and adverbs by their endings ('using', 'used', 'recently'): a topic is a thing.
        is_topic = lambda w: w not in NOT_TOPICS and w not in lexicon and not w.endswith(("ing", "ed", "ly"))
        ranked = sorted(filter(is_topic, counts), key=lambda w: (-counts[w], w))
        topics = ranked[:per_domain]
        if not topics:
            continue
        domain_train, domain_held = shuffled_split(topics, held_out_fraction, random.Random(f"{seed}:topics:{domain}"),
                                                   count=max(1, round(held_out_fraction * len(topics))))
        for group, split in ((domain_train, train), (domain_held, held)):
            split += [{"prompt": TOPIC_PROMPTS[domain].format(topic=t), "domain": domain, "topic": t} for t in group]
    return train, held


def write_prompt_split(prompts_dir: Path, source: str, train: list[dict], held: list[dict]) -> dict[str, str]:
    """`prompts_dir/train/<source>.jsonl` and `prompts_dir/held_out/<source>.jsonl`: several sources
    can share one prompts directory, which every prompt-reading stage takes whole (`read_prompts`)."""
    paths = {"train": prompts_dir / "train" / f"{source}.jsonl", "held_out": prompts_dir / "held_out" / f"{source}.jsonl"}
    write_jsonl(paths["train"], train)
    write_jsonl(paths["held_out"], held)
    return {split: str(path) for split, path in paths.items()}


class HumanSentimentStage:
    name = "human_sentiment"
    config_class = HumanSentimentConfig

    def outputs(self, config: HumanSentimentConfig) -> dict[str, Path]:
        out = Path(config.out_dir)
        return {"train_pairs": out / "train_pairs.jsonl", "held_out_pairs": out / "held_out_pairs.jsonl",
                "gold_train_pairs": out / "gold_train_pairs.jsonl", "sentences": out / "sentences.jsonl"}

    def wire(self, state: RoundState, user: dict[str, Any]) -> dict[str, Any]:
        return {"out_dir": state.out / "human_sentiment", **user}

    def run(self, config: HumanSentimentConfig, ctx: StageContext) -> dict[str, Any]:
        return write_human_sentiment(config)


HUMAN_SENTIMENT = HumanSentimentStage()


# -- chatterbot prompts -------------------------------------------------------
def chatterbot_data_dir() -> Path:
    """The YAML files of the installed `chatterbot-corpus` package."""
    import importlib.util

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.origin:
        raise AlignloopError("chatterbot-corpus is not installed: pip install chatterbot-corpus")
    return Path(spec.origin).parent / "data"


def read_chatterbot_file(path: str | Path, skipped: list[str] | None = None) -> list[dict]:
    """Consecutive turns of each conversation as {"prompt", "response", "category"}.

    A conversation that is not a list of turns is an error, unless `skipped` is
    given: then it is recorded there as `file:conversation N` and left out (the
    real corpus has one: english/trivia.yml's 14th entry is a single string).
    """
    import yaml

    path = Path(path)
    text = read_text(path)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(path, f"not valid YAML ({getattr(e, 'problem', e)})", line=None if mark is None else mark.line + 1) from None
    except RecursionError:
        raise InputError(path, "not usable YAML (nested too deeply)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("conversations"), list):
        raise InputError(path, "expected a mapping with a 'conversations' list", field="conversations")
    categories = doc.get("categories") or [path.stem]
    if not isinstance(categories, list):
        raise InputError(path, f"expected a list, got {type(categories).__name__}", field="categories")
    category = ",".join(map(str, categories))
    rows = []
    for n, conv in enumerate(doc["conversations"], start=1):
        if not isinstance(conv, list) or not all(isinstance(t, (str, int, float)) for t in conv):
            if skipped is None:
                raise InputError(path, f"conversation {n} is not a list of strings", field="conversations")
            skipped.append(f"{path.parent.name}/{path.name}:conversation {n}")
            continue
        turns = [str(t).strip() for t in conv]
        for prompt, response in zip(turns, turns[1:]):
            if prompt and response:
                rows.append({"prompt": prompt, "response": response, "category": category})
    return rows


@dataclasses.dataclass
class ChatterbotConfig(StageConfig):
    out_dir: Path = Path("runs/chatterbot")
    language: str = "english"
    data_dir: Path | None = None  # the corpus's YAML root; None: the installed chatterbot-corpus package
    held_out_fraction: float = 0.1
    seed: int = 0
    prompts_dir: Path | None = None  # also write the prompt split as train/chatterbot.jsonl, held_out/chatterbot.jsonl

    def validate(self) -> None:
        self.require(0 < self.held_out_fraction < 1, "held_out_fraction must be in (0, 1)")


class ChatterbotStage:
    name = "chatterbot"
    config_class = ChatterbotConfig

    def outputs(self, config: ChatterbotConfig) -> dict[str, Path]:
        out = Path(config.out_dir)
        return {"train_prompts": out / "train_prompts.jsonl", "held_out_prompts": out / "held_out_prompts.jsonl"}

    def wire(self, state: RoundState, user: dict[str, Any]) -> dict[str, Any]:
        return {"out_dir": state.out / "chatterbot", **user}

    def run(self, config: ChatterbotConfig, ctx: StageContext) -> dict[str, Any]:
        summary = chatterbot_prompts(config.out_dir, config.language, config.data_dir, config.held_out_fraction,
                                     config.seed)
        if config.prompts_dir is not None:
            out = Path(config.out_dir)
            summary["prompts"] = write_prompt_split(Path(config.prompts_dir), "chatterbot",
                                                    read_jsonl(out / "train_prompts.jsonl"),
                                                    read_jsonl(out / "held_out_prompts.jsonl"))
        return summary


CHATTERBOT = ChatterbotStage()


def chatterbot(config: ChatterbotConfig, ctx: StageContext | None = None) -> dict[str, Any]:
    """The chatterbot prompts and turns, as `chatterbot_prompts` writes them; reused when rerun unchanged."""
    return run_stage(CHATTERBOT, config, ctx)


def chatterbot_prompts(out_dir: str | Path, language: str = "english", data_dir: str | Path | None = None,
                       held_out_fraction: float = 0.1, seed: int = 0) -> dict:
    """Write `prompts.jsonl` (unique prompts), `pairs.jsonl` ({"prompt", "response"}) from chatterbot-corpus,
    and a split by prompt: `train_prompts.jsonl` / `held_out_prompts.jsonl` (for sampling and evaluation)."""
    root = Path(data_dir) if data_dir else chatterbot_data_dir()
    lang_dir = root / language
    if not lang_dir.is_dir():
        raise InputError(lang_dir, f"no such language; have {', '.join(sorted(p.name for p in root.iterdir() if p.is_dir()))}")
    skipped: list[str] = []
    pairs = [row for f in sorted(lang_dir.glob("*.yml")) for row in read_chatterbot_file(f, skipped)]
    out = Path(out_dir)
    prompts = list(dict.fromkeys(p["prompt"] for p in pairs))  # unique, first-seen order
    write_jsonl(out / "pairs.jsonl", pairs)
    write_jsonl(out / "prompts.jsonl", ({"prompt": p} for p in prompts))
    n_held = round(held_out_fraction * len(prompts))
    train, held = shuffled_split(prompts, held_out_fraction, random.Random(seed), count=n_held)
    write_jsonl(out / "held_out_prompts.jsonl", ({"prompt": p} for p in held))
    write_jsonl(out / "train_prompts.jsonl", ({"prompt": p} for p in train))
    return {"out_dir": str(out), "files": len(list(lang_dir.glob("*.yml"))), "pairs": len(pairs), "prompts": len(prompts),
            "held_out_prompts": n_held, "skipped_malformed": skipped}
