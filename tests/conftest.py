import logging
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
logging.getLogger("flwr").propagate = False

MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k"


@pytest.fixture
def movielens_dir() -> Path:
    if not (MOVIELENS / "u.data").is_file():
        pytest.skip("MovieLens-100K not present beside the checkout (../shared/datasets/ml-100k)")
    return MOVIELENS


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Messages built outside a Flower runtime need a run/node identity, as Flower sets one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
