"""The progress display: a bar on a terminal, periodic plain lines elsewhere."""

from __future__ import annotations

import io
import re

import pytest

from distgrow.progress import Progress, ProgressState, format_eta, resolve_mode


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    encoding = "utf-8"  # tqdm draws Unicode blocks where the stream can take them

    def isatty(self) -> bool:
        return True


class AsciiTerminal(io.StringIO):
    encoding = "ascii"

    def isatty(self) -> bool:
        return True


def feed(
    p: Progress,
    clock: FakeClock,
    updates: int,
    *,
    batch: int,
    seconds: float,
    start: int = 0,
    phase: int = 1,
) -> int:
    """``updates`` updates of ``batch`` samples, ``seconds`` apart; returns samples seen."""
    seen = start
    for _ in range(updates):
        clock.now += seconds
        seen += batch
        p.update(
            ProgressState(
                epoch=1 + seen // 10_000,
                samples_seen=seen,
                step=seen // batch,
                phase=phase,
                phases=3,
                global_batch=batch,
                lr=0.1,
            )
        )
    return seen


def test_auto_is_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    assert resolve_mode("auto", Terminal()) == "bar"
    assert resolve_mode("auto", io.StringIO()) == "lines"
    assert resolve_mode("lines", Terminal()) == "lines"
    assert resolve_mode("bar", io.StringIO()) == "bar"
    monkeypatch.setenv("TERM", "dumb")
    assert resolve_mode("auto", Terminal()) == "lines"


def test_format_eta() -> None:
    assert format_eta(65) == "1:05"
    assert format_eta(2 * 3600 + 65) == "2:01:05"
    assert format_eta(None) == "?"
    assert format_eta(float("inf")) == "?"


def test_lines_fill_silence_with_the_facts_and_an_eta() -> None:
    clock, out = FakeClock(), io.StringIO()
    p = Progress(
        "lines", total_samples=100_000, total_epochs=10, stream=out, clock=clock, interval_s=30.0
    )
    seen = feed(p, clock, 25, batch=1000, seconds=1.0)  # 25 s: silent so far
    assert out.getvalue() == ""
    seen = feed(p, clock, 5, batch=1000, seconds=1.0, start=seen)  # 30 s of silence
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("distgrow: progress: epoch 4/10")
    assert "30%" in line and "phase 1/3" in line and "batch 1,000" in line and "lr 0.1" in line
    assert "1,000 samples/s" in line
    assert "ETA 1:10" in line  # 70,000 samples left at 1,000/s
    assert "\r" not in out.getvalue()
    # A message from the trainer counts as output: the next progress line waits 30 s after it.
    clock.now += 20
    p.write("distgrow: epoch 3/10 done")
    feed(p, clock, 29, batch=1000, seconds=1.0, start=seen)
    assert out.getvalue().count("progress:") == 1
    feed(p, clock, 1, batch=1000, seconds=1.0, start=seen + 29_000)
    assert out.getvalue().count("progress:") == 2


def test_eta_follows_the_new_phase_after_a_growth() -> None:
    clock = FakeClock()
    p = Progress(
        "lines",
        total_samples=1_000_000,
        total_epochs=10,
        stream=io.StringIO(),
        clock=clock,
        rate_window_s=5.0,
    )
    seen = feed(p, clock, 60, batch=1000, seconds=1.0)
    assert p.rate == pytest.approx(1000.0)
    seen = feed(p, clock, 60, batch=5000, seconds=1.0, start=seen, phase=2)  # 5× faster
    assert p.rate == pytest.approx(5000.0, rel=1e-3)
    assert p.rate is not None and p.eta_s(seen) == pytest.approx((1_000_000 - seen) / p.rate)


def test_bar_redraws_in_place_within_the_width_and_keeps_messages_above() -> None:
    clock, out = FakeClock(), Terminal()
    p = Progress(
        "bar",
        total_samples=100_000,
        total_epochs=10,
        stream=out,
        clock=clock,
        refresh_s=0.25,
        width=120,
    )
    feed(p, clock, 50, batch=1000, seconds=0.1)  # 5 s: at most 4 redraws a second
    text = out.getvalue()
    draws = text.count("\r")  # tqdm redraws in place: a carriage return, then the line
    assert 15 <= draws <= 21
    last = text.rsplit("\r", 1)[1]
    assert len(last) <= 119
    # The last redraw was at update 49 (49,000 samples): the one after was within 0.25 s.
    # 49% of 30 cells: 14 full, then tqdm's partial block for the 0.7 left.
    assert re.match(r"\|█{14}▋ {15}\| epoch 5/10  49%  step 49  phase 1/3  batch 1,000", last)
    assert "ETA 0:05" in last and "10,000 samples/s" in last
    p.write("distgrow: growth: batch 1000 → 5000")
    after = out.getvalue()[len(text) :]
    # The bar is blanked, the message printed on its own line, then the bar drawn again.
    assert re.match(r"\r {100,119}\rdistgrow: growth: batch 1000 → 5000\n\r\|█{14}▋ ", after)
    assert after.rsplit("\r", 1)[1] == last
    p.close()
    closed = out.getvalue()[len(text) + len(after) :]
    assert re.fullmatch(r"\r {100,119}\r", closed)  # erased, the cursor at its start
    p.write("distgrow: done")  # after close, plain lines without a bar
    assert out.getvalue().endswith(closed + "distgrow: done\n")


def test_bar_falls_back_to_ascii_where_the_stream_cannot_take_unicode() -> None:
    clock, out = FakeClock(), AsciiTerminal()
    p = Progress("bar", total_samples=100_000, total_epochs=10, stream=out, clock=clock, width=120)
    feed(p, clock, 50, batch=1000, seconds=1.0)
    last = out.getvalue().rsplit("\r", 1)[1]
    assert re.match(r"\|#{15} {15}\| epoch 6/10  50%  step 50", last)
    assert "1,000 samples/s  ETA 0:50" in last


def test_bar_is_cut_to_a_narrow_terminal() -> None:
    clock, out = FakeClock(), Terminal()
    p = Progress("bar", total_samples=1000, total_epochs=1, stream=out, clock=clock, width=40)
    feed(p, clock, 1, batch=10, seconds=1.0)
    chunks = out.getvalue().split("\r")
    assert all(len(chunk) <= 39 for chunk in chunks)
    assert chunks[-1].startswith("|") and "epoch 1/1" in chunks[-1]


def test_off_writes_nothing_but_messages() -> None:
    clock, out = FakeClock(), io.StringIO()
    p = Progress("off", total_samples=1000, total_epochs=1, stream=out, clock=clock)
    feed(p, clock, 100, batch=10, seconds=10.0)
    p.close()
    assert out.getvalue() == ""
