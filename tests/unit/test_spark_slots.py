"""How many Python workers batch_score's Spark session runs side by side on one machine (each loads the
model and packs its Linear weights within its share of the memory: lora_pipeline/model/packed_linear.py)."""

from __future__ import annotations

import os

import pytest

from lora_pipeline.model.packed_linear import ENV_PROCESSES
from lora_pipeline.scoring.model import worker_env
from lora_pipeline.scoring.spark import tasks_per_machine


class _Conf:
    def __init__(self, values):
        self.values = values

    def get(self, key, default=None):
        return self.values.get(key, default)


class _Session:
    def __init__(self, **values):
        self.conf = _Conf({k.replace("_", "."): v for k, v in values.items()})


@pytest.mark.parametrize("conf, slots", [
    ({"spark_master": "local"}, 1),
    ({"spark_master": "local[2]"}, 2),
    ({"spark_master": "local[4,3]"}, 4),  # 4 threads, 3 retries
    ({"spark_master": "local[*]"}, os.cpu_count()),
    ({"spark_master": "local[8]", "spark_task_cpus": "2"}, 4),
    ({"spark_master": "local-cluster[2,3,1024]"}, 6),  # 2 workers x 3 cores, all on this machine
    ({"spark_master": "spark://head:7077", "spark_executor_cores": "4"}, 4),
    ({"spark_master": "yarn"}, None),  # the session does not say: each worker counts alone
])
def test_tasks_per_machine(conf, slots):
    assert tasks_per_machine(_Session(**conf)) == slots


def test_workers_are_told_how_many_share_the_machine_unless_the_driver_says(monkeypatch):
    monkeypatch.delenv(ENV_PROCESSES, raising=False)
    assert worker_env("cpu", 2)[ENV_PROCESSES] == "2"
    assert ENV_PROCESSES not in worker_env("cpu", None)
    monkeypatch.setenv(ENV_PROCESSES, "1")  # the user's own setting wins
    assert worker_env("cpu", 2)[ENV_PROCESSES] == "1"
