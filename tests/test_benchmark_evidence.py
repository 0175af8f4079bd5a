"""Every raw-output file the README and the benchmark log cite exists in ``benchmarks/results/``.

The README's speed figures point at the committed output they came from; a figure whose file was
never committed (or was renamed) would be a claim without evidence. File names are found as
written in the docs, ``name-20261203-....txt``, with shell-style braces expanded
(``x-{a,b}-{1,2}.txt`` is four files); a name abbreviated with a leading ``...`` is skipped.
"""

import itertools
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]

#: a file name cited in backticks: optional "benchmarks/results/" and a name ending in .txt
CITED = re.compile(r"`(?:benchmarks/results/)?([A-Za-z0-9_.{},-]+\.txt)`")


def expand_braces(name):
    """``a-{x,y}-{1,2}.txt`` -> the four names, in order."""
    parts = re.split(r"(\{[^}]*\})", name)
    options = [part[1:-1].split(",") if part.startswith("{") else [part] for part in parts]
    return ["".join(choice) for choice in itertools.product(*options)]


def cited_files(text):
    names = []
    for match in CITED.finditer(text):
        if match.start() >= 3 and text[match.start() - 3:match.start()] == "...":
            continue
        for name in expand_braces(match.group(1)):
            if re.search(r"20\d{6}", name):  # dated raw output, not e.g. requirements.txt
                names.append(name)
    return names


def test_expand_braces():
    assert expand_braces("a-{x,y}-{1,2}.txt") == ["a-x-1.txt", "a-x-2.txt", "a-y-1.txt", "a-y-2.txt"]
    assert expand_braces("plain.txt") == ["plain.txt"]


def test_cited_files_finds_names_and_skips_abbreviations():
    text = ("see `benchmarks/results/bench_train-20261203-163948Z.txt` and `x-20261203-{a,b}.txt`, "
            "also `...-after-pool-heads.txt` and `requirements.txt`")
    assert cited_files(text) == ["bench_train-20261203-163948Z.txt", "x-20261203-a.txt", "x-20261203-b.txt"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_cited_raw_output_is_committed(doc):
    if not doc.exists():
        pytest.skip(f"{doc} not in this checkout")
    cited = cited_files(doc.read_text(encoding="utf-8"))
    assert cited, f"{doc.name} cites no raw output at all: the pattern is out of date"
    missing = sorted({name for name in cited if not (RESULTS / name).exists()})
    assert not missing, f"{doc.name} cites raw output that is not in benchmarks/results/: {missing}"
