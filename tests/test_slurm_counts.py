"""SLURM's compressed per-node counts (``2(x3),1``): one parser, read the same by every user."""

from __future__ import annotations

import pytest

from distgrow.launch.environment import _leading_int
from distgrow.launch.slurm_chain import allocation_size
from distgrow.runtime import _slurm_tasks_on_node, slurm_counts


@pytest.mark.parametrize(
    ("text", "counts"),
    [
        ("4", [4]),
        ("2(x3),1", [2, 2, 2, 1]),
        (" 8(x2) , 4 ", [8, 8, 4]),
        ("", None),
        ("2(x),1", None),
        ("gpu:4", None),
        ("2(x3),oops", None),
    ],
)
def test_slurm_counts(text: str, counts: list[int] | None) -> None:
    assert slurm_counts(text) == counts


def test_every_reader_expands_the_same_list() -> None:
    assert [_slurm_tasks_on_node("2(x3),1", node) for node in range(5)] == [2, 2, 2, 1, None]
    env = {"SLURM_JOB_CPUS_PER_NODE": "4(x2),2", "SLURM_NTASKS": "3", "SLURM_JOB_NUM_NODES": "3"}
    assert allocation_size(env)[2] == 10
    # A list SLURM never writes counts nothing: the tasks stand in for the CPUs.
    assert allocation_size({**env, "SLURM_JOB_CPUS_PER_NODE": "4(x2),two"})[2] == 3


def test_a_gpu_count_is_the_first_nodes_whatever_its_form() -> None:
    forms = ["4", "4(x2)", "gpu:4", "a100:4", "gpu:a100:4(x2),2", None, "gpu:", "none"]
    assert [_leading_int(text) for text in forms] == [4, 4, 4, 4, 4, None, None, None]
