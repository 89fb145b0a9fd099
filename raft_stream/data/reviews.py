"""Rotten Tomatoes review snippets with human sentiment ratings, and demo prompts from them.

The 10,605 snippets (Pang & Lee's movie-review sentences, each rated -4..+4 by about 20
people; Hutto & Gilbert, "VADER", ICWSM 2014, MIT licence) ship in the vaderSentiment 3.3.2
source archive, not in its wheel. ``load_snippets`` fetches that archive once with pip and
caches the parsed file.

Example:
    >>> load_snippets()[2]
    Snippet(id=3, rating=-0.6, text='Effective but too tepid biopic')
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from raft_stream.data._cache import cached_folder
from raft_stream.types import PromptRecord

__all__ = ["Snippet", "demo_prompts", "is_heldout", "load_snippets", "split_snippets"]

CACHE_NAME = "rt-snippets-v1"
SDIST = "vaderSentiment==3.3.2"
INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPETS_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
SNIPPETS_FILE = "snippets.tsv"
EXPECTED_SNIPPETS = 10_605
HELDOUT_EVERY = 10
"""One snippet in this many (by a stable hash of its id) is held out: ~10%."""
TEMPLATES = (
    'Write a short review of a movie that critics described as: "{quote}"',
    'Continue this movie review in two or three sentences: "{opening}"',
    'A friend told me this about a movie: "{quote}" Should I watch it? Answer in a few sentences.',
    'Here is the start of a movie review: "{opening}" Finish the review.',
    'What did you think of a movie one critic summed up as "{quote}"? Reply in a few sentences.',
)
"""Demo prompt wordings: ``quote`` is the snippet (up to 25 words), ``opening`` its start."""


@dataclass(frozen=True)
class Snippet:
    """One review snippet and its mean human rating (-4 very negative .. +4 very positive)."""

    id: int
    rating: float
    text: str


def _parse(text: str, source: str) -> list[Snippet]:
    """Tab-separated ``id, rating, text`` lines as snippets; ValueError names a bad line."""
    snippets = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        try:
            if len(fields) != 3:
                raise ValueError(f"expected 3 tab-separated fields, got {len(fields)}")
            snippets.append(Snippet(int(fields[0]), float(fields[1]), fields[2].strip()))
        except ValueError as exc:
            raise ValueError(f"{source}, line {number}: {exc}") from exc
    return snippets


def _fetch(out_dir: Path) -> None:
    """Download the vaderSentiment source archive and keep only the parsed snippets."""
    with tempfile.TemporaryDirectory() as download:
        # pip honours the user's index, proxy and find-links settings, which a plain HTTP
        # fetch of PyPI would not.
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary"]
        command += [":all:", SDIST, "-d", download]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        archives = list(Path(download).glob("*.tar.gz"))
        if done.returncode != 0 or len(archives) != 1:
            raise RuntimeError(
                f"could not fetch the {SDIST} source archive that holds the review "
                f"snippets (`{' '.join(command)}` exited {done.returncode}); it needs PyPI "
                f"or a pip index/find-links that has it.\n{done.stderr[-2000:]}"
            )
        with tarfile.open(archives[0]) as outer:
            inner = outer.extractfile(INNER_ARCHIVE)
            if inner is None:
                raise RuntimeError(f"{archives[0].name} has no {INNER_ARCHIVE}")
            with tarfile.open(fileobj=io.BytesIO(inner.read())) as nested:
                member = nested.extractfile(SNIPPETS_MEMBER)
                if member is None:
                    raise RuntimeError(f"{INNER_ARCHIVE} has no {SNIPPETS_MEMBER}")
                # UTF-8 with CRLF line ends (accented names, curly quotes); utf-8-sig also
                # drops a byte-order mark should a repack add one.
                raw = member.read().decode("utf-8-sig")
    snippets = _parse(raw, SNIPPETS_MEMBER)
    if len(snippets) != EXPECTED_SNIPPETS:
        raise RuntimeError(f"expected {EXPECTED_SNIPPETS} snippets, found {len(snippets)}")
    lines = (f"{s.id}\t{s.rating!r}\t{s.text}\n" for s in snippets)
    (out_dir / SNIPPETS_FILE).write_text("".join(lines), encoding="utf-8")


def load_snippets() -> list[Snippet]:
    """All 10,605 snippets in file order (positive ones first), fetched on first use."""
    path = cached_folder(CACHE_NAME, _fetch) / SNIPPETS_FILE
    return _parse(path.read_text(encoding="utf-8"), str(path))


def _stable_hash(snippet_id: int) -> int:
    # sha256, not hash(): Python salts str hashes per process.
    return int.from_bytes(hashlib.sha256(f"rt-{snippet_id}".encode()).digest()[:8], "big")


def is_heldout(snippet_id: int) -> bool:
    """Whether a snippet belongs to the held-out ~10% (eval prompts, reward validation)."""
    return _stable_hash(snippet_id) % HELDOUT_EVERY == 0


def split_snippets(
    snippets: Sequence[Snippet] | None = None,
) -> tuple[list[Snippet], list[Snippet]]:
    """``(train, heldout)`` snippets, the same split as ``demo_prompts``.

    A learned reward trained on ``train`` has never seen the snippets behind the eval
    prompts, so its held-out accuracy and the eval reward are honest.
    """
    pool = load_snippets() if snippets is None else snippets
    train = [s for s in pool if not is_heldout(s.id)]
    heldout = [s for s in pool if is_heldout(s.id)]
    return train, heldout


def _clean(text: str) -> str:
    # The file writes quotes as two apostrophes and left runs of spaces where dashes were;
    # single quotes keep the text readable inside the prompt's double quotes.
    return " ".join(text.replace("''", "'").replace('"', "'").split())


def _words(text: str, limit: int) -> str:
    words = text.split()
    return " ".join(words) if len(words) <= limit else " ".join(words[:limit]) + " ..."


def _prompt(snippet: Snippet, template: int) -> str:
    """A request for a movie review, seeded by the snippet; ``template`` picks the wording."""
    text = _clean(snippet.text)
    # Enough of the snippet to set its tone, not so much that little is left to write.
    opening = _words(text, max(4, min(10, len(text.split()) // 2)))
    return TEMPLATES[template].format(quote=_words(text, 25), opening=opening)


def demo_prompts(split: Literal["train", "eval"], n: int | None = None) -> list[PromptRecord]:
    """Movie-review requests for the demo chat model, one per snippet of the split.

    ``eval`` holds the prompts of the held-out snippets (``is_heldout``), ``train`` the
    rest; ids (``rt-<snippet id>``) and wording never change. The order is a fixed shuffle,
    so the first ``n`` mix positive and negative snippets and all templates.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    train, heldout = split_snippets()
    chosen = sorted(heldout if split == "eval" else train, key=lambda s: _stable_hash(s.id))
    if n is not None:
        if not 0 <= n <= len(chosen):
            raise ValueError(f"n ({n}) must be between 0 and {len(chosen)}, the {split} prompts")
        chosen = chosen[:n]
    records = []
    for snippet in chosen:
        # Bits of the hash above those that pick the split choose the template, so both
        # splits get every template.
        template = (_stable_hash(snippet.id) // HELDOUT_EVERY) % len(TEMPLATES)
        metadata = {"snippet_id": snippet.id, "rating": snippet.rating, "template": template}
        records.append(
            PromptRecord(
                id=f"rt-{snippet.id}", prompt=_prompt(snippet, template), metadata=metadata
            )
        )
    return records
