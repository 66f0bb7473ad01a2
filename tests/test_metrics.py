"""Progress output and metrics.jsonl: what a user watching a run, or reading its log, sees."""

import io
import json

import pytest

from ldae_fast.engine.metrics import MetricLogger, fmt_duration


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_carry_elapsed_and_eta_and_no_carriage_return(tmp_path):
    clock, out = Clock(), io.StringIO()
    log = MetricLogger(tmp_path, 10, stream=out, clock=clock)
    for step in range(1, 11):
        clock.t += 2.0
        log.tick(step, 8)
        if step % 5 == 0:
            log.log(step, {"loss": 1.0 / step})
    log.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines == [
        "step 5/10 loss 0.2 | elapsed 10s eta 10s",
        "step 10/10 loss 0.1 | elapsed 20s eta 0s",
    ]


def test_tty_bar_redraws_by_time_with_rate_and_eta(tmp_path):
    clock, out = Clock(), Tty()
    log = MetricLogger(tmp_path, 100, stream=out, clock=clock)
    for step in range(1, 101):
        clock.t += 0.25  # four steps a second: about one redraw every four steps
        log.tick(step, 16)
        if step == 50:
            log.log(step, {"loss": 0.5})
    log.close()
    draws = out.getvalue().split("\r")[1:]
    assert 24 <= len(draws) <= 28, len(draws)  # by time, not per step, not per log interval
    after_log = [d for d in draws if "loss 0.5" in d]
    assert after_log and " 50/100 " in after_log[0]  # a log redraws at once
    for d in after_log[1:]:
        n = int(d.split("] ")[1].split("/")[0])
        assert f" 64 img/s {fmt_duration(0.25 * n)} eta {fmt_duration(0.25 * (100 - n))} " in d, d
    assert out.getvalue().endswith("\n")


def test_resume_drops_the_records_after_the_resumed_step(tmp_path):
    first = MetricLogger(tmp_path, 8, stream=io.StringIO())
    for step in range(1, 9):
        first.tick(step, 1)
        if step % 2 == 0:
            first.log(step, {"loss": float(step)})
    first.close()
    # Killed after 8 steps but the newest checkpoint was step 4: the rerun logs 6 and 8 again.
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "loss"')  # a line cut short by the kill
    again = MetricLogger(tmp_path, 8, stream=io.StringIO())
    for step in range(5, 9):
        again.tick(step, 1)
        if step % 2 == 0:
            again.log(step, {"loss": -float(step)})
    again.close()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in recs] == [(2, 2.0), (4, 4.0), (6, -6.0), (8, -8.0)]


def test_fmt_duration():
    assert [fmt_duration(s) for s in (0, 59.4, 61, 3599, 7260)] == ["0s", "59s", "1m01s", "59m59s", "2h01m"]


def test_warmup_longer_than_the_run_warns(tmp_path):
    from ldae_fast.config import build_config
    from ldae_fast.engine.loop import train

    tiny = {"model.width": "32", "model.num_heads": "2", "model.encoder_depth": "1", "model.decoder_depth": "1",
            "data.img_size": "16", "data.batch_size": "8", "data.synthetic_images": "32",
            "tokenizer.fit_images": "16", "engine.kernels": "reference", "engine.progress": "false",
            "eval.probe": "false", "eval.figure": "false", "engine.out_dir": str(tmp_path / "run")}
    with pytest.warns(UserWarning, match=r"optim.warmup_epochs=1 is 4 warm-up steps, not fewer than the run's 2"):
        train(build_config("demo", {**tiny, "engine.steps": "2", "optim.warmup_epochs": "1"}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train(build_config("demo", {**tiny, "engine.steps": "6", "optim.warmup_epochs": "0.5",
                                    "engine.out_dir": str(tmp_path / "run2")}))
