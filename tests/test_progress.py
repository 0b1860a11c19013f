"""jaxface.progress: a \\r bar on a terminal, sparse plain lines in a log."""

import io

import pytest

from jaxface.progress import Progress


class FakeStream(io.StringIO):

  def __init__(self, tty: bool):
    super().__init__()
    self.tty = tty

  def isatty(self):
    return self.tty


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_tty_draws_one_line_with_carriage_returns():
  s = FakeStream(True)
  bar = Progress(3, "enroll", s, clock=FakeClock())
  for f in ("a.jpg", "b.jpg", "c.jpg"):
    bar.step(f)
  text = s.getvalue()
  assert text.count("\r") == 3
  assert text.endswith("\n") and text.count("\n") == 1
  assert "3/3" in text and "c.jpg" in text
  bar.close()  # idempotent: no second newline
  assert s.getvalue().count("\n") == 1


def test_log_mode_writes_sparse_lines_without_carriage_returns():
  s, clock = FakeStream(False), FakeClock()
  bar = Progress(200, "identify", s, clock=clock)
  for _ in range(200):
    clock.now += 0.01  # fast: lines come from the 10% rule, not the 5 s one
    bar.step("x.jpg")
  lines = s.getvalue().splitlines()
  assert "\r" not in s.getvalue()
  assert 9 <= len(lines) <= 11, lines
  assert lines[0].startswith("identify: 20/200 (10%)")
  assert lines[-1].startswith("identify: 200/200 (100%)")
  assert "img/s" in lines[-1]
  assert "x.jpg" not in s.getvalue()


def test_log_mode_writes_every_5_seconds_when_slow():
  s, clock = FakeStream(False), FakeClock()
  bar = Progress(1000, "calibrate", s, clock=clock)
  for _ in range(3):
    clock.now += 6.0
    bar.step()
  assert len(s.getvalue().splitlines()) == 3
  assert s.getvalue().splitlines()[0] == "calibrate: 1/1000 (0%), 0.2 img/s"


def test_log_mode_final_line_on_close_when_stopped_early():
  s, clock = FakeStream(False), FakeClock()
  bar = Progress(100, "known", s, clock=clock)
  bar.step()
  assert s.getvalue() == ""
  bar.close()
  assert s.getvalue().startswith("known: 1/100 (1%)")
  bar.close()
  assert len(s.getvalue().splitlines()) == 1


def test_disabled_or_empty_writes_nothing():
  for bar_args in ((5, "x", FakeStream(False), False), (0, "x", FakeStream(True), True),
                   (5, "x", FakeStream(True), False)):
    bar = Progress(*bar_args)
    for _ in range(5):
      bar.step()
    bar.close()
    assert bar_args[2].getvalue() == ""


def test_negative_total_is_an_error():
  with pytest.raises(ValueError, match="total=-1"):
    Progress(-1, "x", FakeStream(False))
