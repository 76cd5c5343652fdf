"""Shared fixtures for memplan's tests, and which tests are slow.

The default ``pytest`` run leaves out the tests marked ``slow`` (pyproject.toml: ``-m "not slow"``);
``.ci/run`` runs them too (``pytest -m slow``). A test is slow when it takes 5 s or more on an idle
2-core machine (10 s and more under load). Most are marked where they are defined; the ones below
are tests of other stages marked here by name, with the seconds they took (2026-12-02, idle, one
thread), and every test that uses one of SLOW_FIXTURES (a module fixture that plans REV on a U-Net).
"""
import pytest
import torch

torch.set_num_threads(1)

SLOW_TESTS = {
    "tests/test_kusumoto.py::test_exact_dp_equals_brute_force": 27.5,
    "tests/test_pose_cli.py::test_real_rev_training_then_refine_runs_the_trained_substituted_network": 24.0,
    "tests/test_rev_plan.py::test_budget_error_says_what_rev_would_reach_and_rev_reaches_it": 7.3,
    "tests/test_compile.py::test_budget_between_cost_model_floor_and_simulated_floor_is_accepted": 7.0,
    "tests/test_face_train.py::test_tiny_config_trains_with_loss_falling": 6.8,
    "tests/test_compile.py::test_infeasible_budget_names_the_floor": 5.9,
    "tests/test_head_train.py::test_tiny_config_trains_with_loss_falling": 5.6,
    "tests/test_pose_train.py::test_budget_below_the_minimum_names_the_fix": 5.3,
    "tests/test_head_train.py::test_cli_train_then_evaluate": 5.0,
}
SLOW_FIXTURES = {"compiled64": 9.9, "unet_meta": 10.8}      # tests/test_rev_plan.py, setup seconds


def pytest_collection_modifyitems(config, items):
    """Mark the tests named in SLOW_TESTS, or using a SLOW_FIXTURES fixture, as slow."""
    for item in items:
        if item.nodeid.split("[")[0] in SLOW_TESTS or SLOW_FIXTURES.keys() & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
