"""The ranking-only user vector: fitted on device without DP, never in what is sent."""

import torch

from attune.client.training import LocalData, fit_rank_vector
from attune.shared.model import ModelConfig, Personalization


def test_rank_vector_prefers_the_persons_items_and_leaves_model_untouched():
    g = torch.Generator().manual_seed(0)
    model = Personalization(ModelConfig(num_items=30, dim=6, use_context=False), generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mine = torch.tensor([1, 2, 3, 4, 5] * 4)
    data = LocalData(items=mine, weights=torch.ones(20), context=None)
    vector = fit_rank_vector(model, data, steps=200, lr=0.1, generator=g)
    scores = model.item_embedding.weight @ vector + model.item_bias.weight[:, 0]
    others = torch.tensor([i for i in range(30) if i not in range(1, 6)])
    assert scores[1:6].mean() > scores[others].mean() + 0.5
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name])
