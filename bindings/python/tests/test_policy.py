"""`simfreeze.Policy`: loading, observing, the contract, failures, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import simfreeze


def step_args(step, total=20, batch=4, dim=6, layers=3, classes=2):
    g = np.random.default_rng(step)
    return dict(
        step=step,
        loss=1.0 / (step + 1),
        total_steps=total,
        steps_per_epoch=10,
        features=g.standard_normal((batch, dim)).astype(np.float32),
        labels=np.arange(batch) % classes,
        num_classes=classes,
        grad_norms=np.full(layers, 0.5, dtype=np.float32),
        lr=0.01,
    )


def test_shipped_plugins_load_by_name_and_describe_themselves():
    names = {p["name"] for p in simfreeze.available()}
    assert {"atsf", "slf", "autofreeze", "template"} <= names
    p = simfreeze.Policy("atsf", layers=3)
    assert p.name == "atsf"
    assert p.needs == {"CLS_FEATURES", "LABELS"}
    assert p.info["contract"] in (1, 2)
    assert p.frontier == 0 and p.probe is None and p.lr_factors == (1.0, 1.0, 1.0)


def test_unknown_plugin_names_the_search_path():
    with pytest.raises(simfreeze.PluginLoadError, match="not found.*plugins"):
        simfreeze.Policy("no-such-policy", layers=3)


def test_bad_options_are_refused_with_the_plugin_message():
    with pytest.raises(simfreeze.PluginLoadError, match="could not be created"):
        simfreeze.Policy("slf", "(t0: \"half\")", layers=3)


def test_slf_freezes_on_schedule_and_sets_learning_rate_factors():
    p = simfreeze.Policy("slf", "(t0: 0.5)", layers=3)
    decisions = [p.observe(**step_args(s)) for s in range(20)]
    frontiers = [d.frontier for d in decisions]
    assert frontiers == sorted(frontiers) and frontiers[-1] == 3
    assert any(d.committed for d in decisions)
    assert any(f != 1.0 for d in decisions[:5] for f in d.lr_factors)
    timeline = p.timeline()
    assert timeline["steps"] == 20
    assert all(s is not None for s in timeline["freeze_step"])


def test_torch_tensors_and_numpy_arrays_give_the_same_decisions():
    a = simfreeze.Policy("atsf", "(record_steps: 2, compare_steps: 2, tolerance: 0.01)", layers=3)
    b = simfreeze.Policy("atsf", "(record_steps: 2, compare_steps: 2, tolerance: 0.01)", layers=3)
    for s in range(20):
        args = step_args(s)
        da = a.observe(**args)
        args["features"] = torch.from_numpy(args["features"])
        args["labels"] = torch.from_numpy(args["labels"])
        args["loss"] = torch.tensor(args["loss"])
        db = b.observe(**args)
        assert da == db


def test_missing_and_misshapen_inputs_raise_value_errors():
    p = simfreeze.Policy("atsf", layers=3)
    args = step_args(0)
    del args["features"]
    with pytest.raises(ValueError, match="needs CLS_FEATURES"):
        p.observe(**args)
    args = step_args(0)
    args["labels"] = np.arange(3)
    with pytest.raises(ValueError, match="labels: 3 for a batch of 4"):
        p.observe(**args)
    args = step_args(0)
    args["features"] = np.zeros((4, 2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="batch x dim"):
        p.observe(**args)
    a = simfreeze.Policy("autofreeze", layers=3)
    args = step_args(0)
    args["grad_norms"] = np.ones(2, dtype=np.float32)
    with pytest.raises(ValueError, match="2 values for 3 blocks"):
        a.observe(**args)


def test_state_dict_continues_identically():
    opts = "(record_steps: 2, compare_steps: 2, tolerance: 0.01)"
    a = simfreeze.Policy("atsf", opts, layers=3)
    for s in range(7):
        a.observe(**step_args(s))
    state = a.state_dict(step=7)
    b = simfreeze.Policy("atsf", opts, layers=3)
    b.load_state_dict(state)
    assert (b.frontier, b.probe) == (a.frontier, a.probe)
    for s in range(7, 20):
        assert a.observe(**step_args(s)) == b.observe(**step_args(s))
    assert a.timeline() == b.timeline()
    with pytest.raises(ValueError, match="`atsf` on 3 blocks"):
        simfreeze.Policy("slf", layers=3).load_state_dict(state)


def test_a_policy_that_unfreezes_raises_a_contract_violation(fixtures):
    p = simfreeze.Policy(fixtures / "libfixture_misbehaving.so", "(mode: unfreeze, at: 3)", layers=3)
    for s in range(3):
        p.observe(**step_args(s))
    assert p.frontier == 1
    with pytest.raises(simfreeze.ContractViolation, match="frontier went down from 1 to 0") as e:
        p.observe(**step_args(3))
    assert "frozen blocks never unfreeze" in str(e.value)
    assert isinstance(e.value, simfreeze.PolicyError)
    assert p.frontier == 1  # refused as a whole: the state is unchanged


def test_a_panicking_policy_raises_and_the_interpreter_lives(fixtures):
    p = simfreeze.Policy(fixtures / "libfixture_misbehaving.so", "(mode: panic_decide, at: 1)", layers=3)
    p.observe(**step_args(0))
    with pytest.raises(simfreeze.PolicyPanicked, match="deliberate panic in decide"):
        p.observe(**step_args(1))
    with pytest.raises(simfreeze.PluginLoadError, match="panicked while being created"):
        simfreeze.Policy(fixtures / "libfixture_misbehaving.so", "(mode: panic_new)", layers=3)
    err = simfreeze.Policy(fixtures / "libfixture_misbehaving.so", "(mode: error_decide, at: 0)", layers=3)
    with pytest.raises(simfreeze.PolicyFailed, match="decide always fails"):
        err.observe(**step_args(0))
    # Still alive, and other policies still work.
    assert simfreeze.Policy("slf", layers=3).observe(**step_args(0)).step == 0


def test_a_plugin_built_against_the_first_abi_still_runs(fixtures):
    old = simfreeze.Policy(fixtures / "libfixture_autofreeze_v1.so", layers=3)
    new = simfreeze.Policy("autofreeze", layers=3)
    assert old.info["abi_version"] == "0.1.0" and old.info["contract"] == 1
    for s in range(40):
        args = step_args(s)
        # Gradient norms that stall: AutoFreeze freezes on them.
        args["grad_norms"] = np.array([1.0 / (1 + s), 0.5, 2.0], dtype=np.float32)
        assert old.observe(**args) == new.observe(**args)
    assert old.timeline()["steps"] == 40
