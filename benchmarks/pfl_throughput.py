"""Second anchor for benchmarks/throughput.py: pfl-research (Apple's ``pfl``) on the same task.

MovieLens-100K, 943 simulated users, one central iteration with every user. Each user trains the
same model as the throughput benchmark (dim 4 item vectors and biases, a user vector, BCE with
one sampled negative per event) for the same 5 full-batch local steps at lr 6, in pfl's own
simulation loop (``SimulatedBackend``, ``FederatedAveraging``). pfl clips each user's whole update
and noises the sum (its ``GaussianMechanism``, user-level DP): it has no per-event DP-SGD on the
device, so this times pfl's local training and aggregation, not Attune's mechanism.

pfl is not an Attune dependency; it runs in its own environment (the file imports nothing from
Attune)::

    python -m venv .venv-pfl && .venv-pfl/bin/pip install torch==2.13.0 "pfl[pytorch]==0.6.0"
    .venv-pfl/bin/python benchmarks/pfl_throughput.py --data ../shared/datasets/ml-100k

Prints and writes benchmarks/results/pfl_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from pfl.aggregate.simulate import SimulatedBackend
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Weighted
from pfl.model.pytorch import PyTorchModel
from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism

DIM, LOCAL_STEPS, LR = 4, 5, 6.0


class Scorer(torch.nn.Module):
    """Item vectors and biases plus one user vector: the throughput benchmark's model."""

    def __init__(self, num_items: int) -> None:
        super().__init__()
        self.items = torch.nn.Embedding(num_items, DIM)
        self.bias = torch.nn.Embedding(num_items, 1)
        self.user = torch.nn.Parameter(torch.zeros(DIM))
        torch.nn.init.normal_(self.items.weight, 0.0, DIM**-0.5)
        torch.nn.init.zeros_(self.bias.weight)

    def loss(self, items: torch.Tensor) -> torch.Tensor:
        negatives = torch.randint(0, self.items.num_embeddings, items.shape)
        both = torch.stack([items, negatives], dim=1)
        logits = self.items(both) @ self.user + self.bias(both)[..., 0]
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        return loss / len(items)

    @torch.no_grad()
    def metrics(self, items: torch.Tensor, eval: bool = False) -> dict:  # noqa: A002 (pfl's keyword)
        return {"loss": Weighted(float(self.loss(items)) * len(items), len(items))}


def load_users(data: Path) -> tuple[dict[int, np.ndarray], int]:
    """Each user's item ids (0-based), the latest event held out as in Attune's protocol."""
    raw = np.loadtxt(data / "u.data", dtype=np.int64)
    users, items, stamps = raw[:, 0] - 1, raw[:, 1] - 1, raw[:, 3]
    order = np.lexsort((np.arange(len(raw)), stamps, users))
    per_user: dict[int, list[int]] = {}
    for row in order:
        per_user.setdefault(int(users[row]), []).append(int(items[row]))
    return {u: np.asarray(v[:-1]) for u, v in per_user.items()}, int(items.max()) + 1


def rate(per_user: dict[int, np.ndarray], num_items: int, cohort: int) -> float:
    """Client updates per second over one central iteration with ``cohort`` users."""
    ids = sorted(per_user)[:cohort]
    dataset = FederatedDataset(
        make_dataset_fn=lambda u: Dataset(raw_data=[torch.from_numpy(per_user[u])], user_id=u),
        user_sampler=get_user_sampler("minimize_reuse", ids),
        user_id_to_weight={u: len(per_user[u]) for u in ids})
    privacy = CentrallyAppliedPrivacyMechanism(
        GaussianMechanism(clipping_bound=1.0, relative_noise_stddev=1.0))
    backend = SimulatedBackend(training_data=dataset, val_data=dataset, postprocessors=[privacy])
    module = Scorer(num_items)
    model = PyTorchModel(module, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0))
    params = NNAlgorithmParams(central_num_iterations=1, evaluation_frequency=10**6,
                               train_cohort_size=len(ids), val_cohort_size=0)
    train = NNTrainHyperParams(local_learning_rate=LR, local_num_epochs=LOCAL_STEPS, local_batch_size=None)
    started = time.perf_counter()
    FederatedAveraging().run(algorithm_params=params, backend=backend, model=model,
                             model_train_params=train,
                             model_eval_params=NNEvalHyperParams(local_batch_size=None))
    return len(ids) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/ml-100k"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    per_user, num_items = load_users(args.data)
    rate(per_user, num_items, 20)  # imports and first calls
    result = {"devices": len(per_user), "local_steps": LOCAL_STEPS,
              "pfl_updates_per_s": rate(per_user, num_items, len(per_user))}
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "pfl_throughput.json"
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
