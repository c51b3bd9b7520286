"""Decision parity: a `simfreeze run`'s observation stream, replayed
through the Python package, gives exactly the decisions the trainer took."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import simfreeze

CASES = {
    "atsf": "(record_steps: 2, compare_steps: 2, tolerance: 0.01)",
    "slf": "(t0: 0.3)",
    "autofreeze": "(interval: 4)",
}


# Contract 2: their observations' values recorded (train.record_on_demand).
ON_DEMAND = {
    "egeria": "(every: 2, window: 2, threshold: 0.5)",
    "smartfrz": "(threshold: 0.05, every: 2)",
}


def run_with_observations(simfreeze_bin: Path, tmp: Path, plugin: str, options: str,
                          on_demand: bool = False) -> Path:
    config = tmp / "c.ron"
    config.write_text(
        f"""(
    name: "parity-{plugin}",
    output: {json.dumps(str(tmp / "runs"))},
    model: (preset: "tiny_fmnist", image_size: 8, patch: 4, dim: 12, depth: 4, heads: 3, mlp_ratio: 2.0),
    data: (source: Synthetic(train: 96, eval: 32, classes: 4)),
    train: (epochs: 4, batch: 8, threads: 1, device: "cpu", tensorboard: false,
            record_observations: true, record_on_demand: {str(on_demand).lower()}, sgd: (lr: 0.05)),
    policy: (plugin: {json.dumps(plugin)}, options: {json.dumps(options)}),
)"""
    )
    subprocess.run([str(simfreeze_bin), "run", "--config", str(config)], check=True,
                   capture_output=True)
    (run,) = (tmp / "runs").iterdir()
    return run


@pytest.mark.parametrize("plugin", sorted(CASES))
def test_replay_takes_the_trainers_decisions(simfreeze_bin, tmp_path, plugin):
    run = run_with_observations(simfreeze_bin, tmp_path, plugin, CASES[plugin])
    records = simfreeze.read_observations(run / "observations.jsonl")
    assert len(records) == 48  # 4 epochs of 12 steps
    policy = simfreeze.Policy(plugin, CASES[plugin], layers=4)
    replayed = simfreeze.replay(records, policy)
    for record, decision in replayed:
        assert simfreeze.matches(record, decision), (
            f"step {record['step']}: the run set {record['after']}, the replay {decision}"
        )
    # The same freeze steps, probes and scalars as the run's own timeline;
    # and the run froze something, so the comparison says something.
    summary = json.loads((run / "summary.json").read_text())
    timeline = policy.timeline()
    assert timeline["freeze_step"] == summary["freeze_step"]
    assert timeline["probe_steps"] == summary["probe_steps"]
    assert any(s is not None for s in timeline["freeze_step"])


def test_a_changed_policy_is_caught_by_the_replay(simfreeze_bin, tmp_path):
    run = run_with_observations(simfreeze_bin, tmp_path, "slf", "(t0: 0.3)")
    records = simfreeze.read_observations(run / "observations.jsonl")
    other = simfreeze.Policy("slf", "(t0: 0.6)", layers=4)
    assert not all(simfreeze.matches(r, d) for r, d in simfreeze.replay(records, other))


@pytest.mark.parametrize("plugin", sorted(ON_DEMAND))
def test_replay_of_a_contract2_policy_takes_the_trainers_decisions(simfreeze_bin, tmp_path, plugin):
    run = run_with_observations(simfreeze_bin, tmp_path, plugin, ON_DEMAND[plugin], on_demand=True)
    records = simfreeze.read_observations(run / "observations.jsonl")
    carried = [r for r in records if r["provided"]]
    assert carried and all(r["more"] for r in carried)
    policy = simfreeze.Policy(plugin, ON_DEMAND[plugin], layers=4)
    for record, decision in simfreeze.replay(records, policy):
        assert simfreeze.matches(record, decision), (
            f"step {record['step']}: the run set {record['after']}, the replay {decision}"
        )
    summary = json.loads((run / "summary.json").read_text())
    timeline = policy.timeline()
    assert timeline["freeze_step"] == summary["freeze_step"]
    assert any(s is not None for s in timeline["freeze_step"])


def test_a_contract2_replay_without_the_values_says_how_to_record_them(simfreeze_bin, tmp_path):
    run = run_with_observations(simfreeze_bin, tmp_path, "egeria", ON_DEMAND["egeria"])
    records = simfreeze.read_observations(run / "observations.jsonl")
    policy = simfreeze.Policy("egeria", ON_DEMAND["egeria"], layers=4)
    with pytest.raises(ValueError, match="record_on_demand"):
        simfreeze.replay(records, policy)
