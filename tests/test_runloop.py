"""jaxface.runloop: the run-loop scaffolding shared by the drivers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxface import runloop


class FakeClock:

  def __init__(self):
    self.now = 50.0

  def __call__(self):
    return self.now


def test_every_is_the_cadence_and_last_always_counts():
  assert [s for s in range(1, 10) if runloop.every(s, 3)] == [3, 6, 9]
  assert not runloop.every(4, 3) and runloop.every(4, 3, last=True)
  assert not any(runloop.every(s, 0) for s in range(1, 10))   # switched off
  assert runloop.every(7, 0, last=True)


def test_metrics_log_appends_whole_json_lines_in_key_order(tmp_path):
  log = runloop.MetricsLog(str(tmp_path))
  assert log.path == str(tmp_path / "train_log.jsonl") and log.enabled  # one process: primary
  log.write({"step": 1, "scale": 0, "train/loss": 2.5})
  log.write({"step": 2, "scale": 0, "train/loss": 1.5})
  again = runloop.MetricsLog(str(tmp_path))  # a resumed run appends
  again.write({"step": 3, "train/loss": 1.0})
  lines = (tmp_path / "train_log.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1, 2, 3]
  assert lines[0] == '{"step": 1, "scale": 0, "train/loss": 2.5}'


def test_metrics_log_is_silent_off_the_primary_process(tmp_path, monkeypatch):
  runloop.MetricsLog(str(tmp_path), "other.jsonl", enabled=False).write({"step": 1})
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert not runloop.is_primary()
  runloop.MetricsLog(str(tmp_path)).write({"step": 1})
  assert list(tmp_path.iterdir()) == []
  said = []
  runloop.primary_printer(said.append)("hello")
  assert said == []
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  runloop.primary_printer(said.append)("hello")
  assert said == ["hello"]


def test_check_finite_names_the_metric_and_step():
  runloop.check_finite({"train/loss": 1.0, "train/tv": 0.0}, 3)
  with pytest.raises(runloop.NonFiniteError, match=r"non-finite train/tv \(nan\) at step 7. lower it"):
    runloop.check_finite({"train/loss": 1.0, "train/tv": float("nan")}, 7, hint="lower it")

  class MyError(RuntimeError):
    pass

  with pytest.raises(MyError, match=r"non-finite loss \(inf\) at step 2$"):
    runloop.check_finite({"loss": np.float32(np.inf)}, 2, error=MyError)


def test_check_bad_step_reads_the_in_graph_guard():
  runloop.check_bad_step(jnp.asarray(-1, jnp.int32), what="cost", kept="x")
  with pytest.raises(runloop.NonFiniteError) as e:
    runloop.check_bad_step(jnp.asarray(4, jnp.int32), what="loss or gradient",
                           kept="parameters are kept from step {step}", hint="Lower the rate")
  assert str(e.value) == ("non-finite loss or gradient at step 4; parameters are kept from step 4 "
                          "and nothing after it was saved. Lower the rate")


def test_host_metrics_is_one_transfer_to_floats():
  out = runloop.host_metrics({"a": jnp.float32(1.5), "b": jnp.asarray(2, jnp.int32)})
  assert out == {"a": 1.5, "b": 2.0} and all(type(v) is float for v in out.values())


def test_meter_rate_and_eta_follow_the_latest_interval():
  clock = FakeClock()
  meter = runloop.Meter(10, clock=clock)
  assert meter.eta(5) == float("inf") and runloop.format_eta(meter.eta(5)) == "?"
  clock.now += 100.0                     # the first interval holds the compile
  assert meter.tick(20) == pytest.approx(0.1)
  clock.now += 2.0
  assert meter.tick(30) == pytest.approx(5.0)
  assert meter.eta(3600 * 5) == pytest.approx(3600)
  assert runloop.format_eta(meter.eta(3600 * 5 + 61 * 5)) == "1:01:01"
  assert meter.elapsed() == pytest.approx(102.0)
  assert runloop.format_eta(-3) == "0:00:00"
  assert runloop.bar(5, 20) == "[#####" + "." * 15 + "]" and runloop.bar(0, 0, 4) == "[....]"


def test_save_copy_saves_a_copy_forced():
  saved = []

  class FakeCheckpointer:
    def save(self, step, state, config, *, force=False):
      saved.append((step, state, config, force))
      return True

  state = {"w": jnp.arange(3.0)}
  assert runloop.save_copy(FakeCheckpointer(), 5, state, {"lr": 1})
  step, copy, config, force = saved[0]
  assert (step, config, force) == (5, {"lr": 1}, True)
  assert copy["w"] is not state["w"]
  np.testing.assert_array_equal(copy["w"], state["w"])


def test_printers(capsys):
  runloop.stderr_printer("to stderr")
  runloop.quiet("nothing")
  out, err = capsys.readouterr()
  assert out == "" and err == "to stderr\n"
