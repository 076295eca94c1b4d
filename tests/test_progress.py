"""Progress displays: tqdm's bar in a terminal, a few whole lines anywhere else."""

from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from tympan import progress as p


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines as soon as each step is reached (the real minimum interval is seconds)."""
    monkeypatch.setattr(p, "MIN_INTERVAL_S", 0.0)


def test_a_terminal_gets_tqdm_and_anything_else_lines():
    assert isinstance(p.progress(10, "x", "clip", stream=Terminal()), tqdm)
    assert isinstance(p.progress(10, "x", "clip", stream=io.StringIO()), p.Lines)


def test_lines_one_per_step_each_whole_with_its_postfix(no_wait):
    out = io.StringIO()
    with p.progress(
        60, "train member 1 of 3 (seed 0)", "epoch", step_percent=25, stream=out
    ) as bar:
        for epoch in range(60):
            bar.set_postfix({"loss": f"{1 / (epoch + 1):.3f}"})
            bar.update(1)
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert [line.split(", ")[0] for line in lines] == [
        f"train member 1 of 3 (seed 0): {n}/60 epochs ({n * 100 // 60}%)" for n in (15, 30, 45, 60)
    ]
    assert lines[-1].endswith("loss=0.017")  # the postfix of the epoch the line reports


def test_lines_at_most_one_per_interval_and_always_the_last():
    out = io.StringIO()  # the real interval: a quick loop is one line
    with p.progress(2400, "featurize", "clip", stream=out) as bar:
        for _ in range(0, 2400, 64):
            bar.update(min(64, 2400 - bar.n))
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]
    assert out.getvalue().startswith("featurize: 2400/2400 clips (100%), ")


def test_a_loop_that_stops_early_says_where(no_wait):
    out = io.StringIO()
    with p.progress(60, "seed 0", "epoch", initial=20, step_percent=25, stream=out) as bar:
        for _ in range(3):  # resumed at epoch 20, early stopping at 23
            bar.update(1)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert out.getvalue().startswith("seed 0: 23/60 epochs (38%)")


def test_disabled_shows_nothing():
    out = io.StringIO()
    for stream in (out, Terminal()):
        with p.progress(5, "x", "clip", enabled=False, stream=stream) as bar:
            bar.update(5)
    assert out.getvalue() == ""
    assert list(p.track(iter("abc"), 3, "x", "item", enabled=False)) == ["a", "b", "c"]
