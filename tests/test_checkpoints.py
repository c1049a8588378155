"""One fine-tune, the user's: rungs are its checkpoints, promotion continues a run, every token is charged once."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from autoqra_core.errors import AutoQRAError
from autoqra_core.evaluation import Evaluation
from autoqra_core.fidelity import FineTune, Ladder, Rung
from autoqra_core.finetune import TrainSettings, learning_rate, run_config
from autoqra_core.protocol import charged_tokens, history_tokens
from autoqra_core.quantize import QuantSettings
from autoqra_core.space import SearchSpace
from tasks.evaluate import SEGMENTS_ENV

from .helpers import AUTOQRA, ROOT, cli_env, embedded  # noqa: F401 - fixture


def test_ladder_is_fractions_of_one_fine_tune():
    ladder = Ladder.of(90)
    assert [f.steps for f in ladder.rungs] == [10, 30, 90]
    assert {f.total_steps for f in ladder.rungs} == {90}  # one schedule, over the whole run
    assert ladder.full is ladder[ladder.top] and ladder.fine_tunes(2 * ladder.full.train_tokens) == 2
    with pytest.raises(AutoQRAError, match="too short"):
        Ladder.of(4)  # 1/9 and 1/3 of 4 steps are both step 1
    with pytest.raises(AutoQRAError, match="end at 1"):
        Ladder.of(90, (Rung(0.5), Rung(0.9)))


def test_fine_tune_length_is_steps_or_epochs_capped():
    assert FineTune(steps=50).total_steps(n_blocks=10_000) == 50
    assert FineTune(batch_size=8).total_steps(n_blocks=100) == 13  # one epoch, the last batch partial
    assert FineTune(epochs=2, batch_size=8).total_steps(n_blocks=100) == 25
    assert FineTune(max_steps=7).total_steps(n_blocks=100) == 7


def test_schedule_spans_the_whole_run():
    t = TrainSettings(lr=1.0, warmup_steps=2)
    lrs = [learning_rate(s, 90, t) for s in range(90)]
    assert lrs[0] == 0.5 and lrs[1] == pytest.approx(1.0, abs=1e-3)
    assert lrs[10] > 0.9 and lrs[-1] < 0.01  # a 1/9 checkpoint is early in the decay, not its end
    wsd = TrainSettings(lr=1.0, warmup_steps=2, schedule="wsd", decay_fraction=0.2)
    w = [learning_rate(s, 90, wsd) for s in range(90)]
    assert w[30] == w[70] == 1.0 and w[80] < 1.0 and w[-1] < 0.1  # stable, then linear decay in the last 20%


def test_promotion_charges_each_token_once():
    space = SearchSpace(["a", "b"], (4, 8), (8, 16))
    ladder = Ladder.of(90)
    c, d = space.uniform(4, 8), space.uniform(8, 16)
    history = [Evaluation(c, 0, 1.0, 0), Evaluation(d, 0, 1.0, 0), Evaluation(c, 1, 1.0, 0), Evaluation(c, 2, 1.0, 0),
               Evaluation(d, 2, 1.0, 0, seed=7)]  # d on another seed: a new run from step 0
    per_step = ladder.full.batch_size * ladder.full.seq_len
    assert [t // per_step for t in charged_tokens(history, ladder)] == [10, 10, 20, 60, 90]
    assert history_tokens(history, ladder) == (10 + 10 + 20 + 60 + 90) * per_step


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_continued_run_is_the_uninterrupted_run(embedded, schedule):
    """Stopped at a rung and continued: the same adapter, optimizer state and losses as the run that never stopped
    (fp32, embedded model, dropout on so the RNG state matters)."""
    base, tok, task, lmap = embedded
    cfg = SearchSpace(lmap.names).uniform(4, 8).replace(0, rank=16)
    ladder = Ladder.of(9, (Rung(1 / 3, 8), Rung(1.0, 8)), data_fraction=0.05, seq_len=32, batch_size=4)
    q, t = QuantSettings("sim"), TrainSettings(dropout=0.1, schedule=schedule, seed=3)
    whole_ev, whole = run_config(base, tok, task, lmap, cfg, ladder[1], 1, 0, q, t)
    _, first = run_config(base, tok, task, lmap, cfg, ladder[0], 0, 0, q, t, split=None)
    ev, rest = run_config(base, tok, task, lmap, cfg, ladder[1], 1, 0, q, t, start=first)
    assert first.step == 3 and rest.step == whole.step == 9
    assert rest.losses[:3] == first.losses and rest.losses == whole.losses
    assert max((whole.adapter[k] - rest.adapter[k]).abs().max().item() for k in whole.adapter) <= 1e-6
    moments = [(a["exp_avg"], b["exp_avg"]) for a, b in zip(whole.optimizer["state"].values(),
                                                             rest.optimizer["state"].values())]
    assert moments and all(torch.equal(a, b) for a, b in moments)
    assert ev.eval_loss == whole_ev.eval_loss
    if schedule == "wsd":
        return
    # a fresh run stopped at the 1/3 checkpoint is not a 3-step run: its schedule is the 9-step run's
    _, short = run_config(base, tok, task, lmap, cfg, ladder[0].__class__(3, 0.05, 32, 4, 8), 0, 0, q, t, split=None)
    assert short.losses[:1] == first.losses[:1] and short.adapter.keys() == first.adapter.keys()
    assert any((short.adapter[k] - first.adapter[k]).abs().max() > 0 for k in short.adapter)


SETTINGS = """
train: {steps: 240, data_fraction: 0.2, seq_len: 32, batch_size: 4}
search:
  rungs: [{fraction: 0.25, eval_examples: 8}, {fraction: 1.0, eval_examples: 8}]
"""


def _segments(path) -> list[tuple[int, int, str]]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        steps, what = line.split(" steps ")[1].split()
        a, b = steps.split("-")
        out.append((int(a), int(b), what))
    return out


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    """`autoqra evaluate` at rung 0 leaves a checkpoint at step 60; at rung 1 the run continues from it. Killed mid
    rung 1 and run again, it continues from step 60 again: the steps before the checkpoint are trained once."""
    cfg = tmp_path / "s.yaml"
    cfg.write_text(SETTINGS)
    config = tmp_path / "c.json"
    config.write_text('{"layers": [' + ",".join(f'{{"name": "model.layers.{i}", "bits": 4, "rank": 8}}'
                                                 for i in range(6)) + "]}")
    segments = tmp_path / "segments.txt"
    env = cli_env(tmp_path, **{SEGMENTS_ENV: str(segments)})
    cmd = [*AUTOQRA, "evaluate", "--config", str(config), "--search-config", str(cfg), "--seed", "5"]
    r = subprocess.run([*cmd, "--fidelity", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _segments(segments) == [(0, 60, "started"), (0, 60, "done")]

    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([*cmd, "--fidelity", "1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and (60, 240, "started") not in _segments(segments):
        time.sleep(0.1)
    time.sleep(1.0)  # a few steps into rung 1
    assert proc.poll() is None, "the run finished before it could be killed: make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (60, 240, "done") not in _segments(segments)

    r = subprocess.run([*cmd, "--fidelity", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _segments(segments) == [(0, 60, "started"), (0, 60, "done"), (60, 240, "started"),
                                   (60, 240, "started"), (60, 240, "done")]
    assert "step 240/240" in r.stdout + r.stderr  # the run's progress is shown
