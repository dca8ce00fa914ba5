"""The World is made from torchrun's environment, once: what it reads and what it refuses."""

import pytest
import torch

from fastpretrain.errors import UserError
from fastpretrain.train.world import init_world


def test_alone_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    world = init_world("cpu")
    assert (world.rank, world.local_rank, world.world_size, world.backend) == (0, 0, 1, None)
    assert world.is_main and not world.distributed and world.device == torch.device("cpu")
    assert world.sum([1.5, 2.0]) == [1.5, 2.0] and world.gather({"a": 1}) == [{"a": 1}]


@pytest.mark.parametrize("env, message", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "do not make a world"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "do not make a world"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "-1"}, "do not make a world"),
])
def test_an_impossible_environment_is_one_line(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=message):
        init_world("cpu")


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match="CUDA is not available"):
        init_world("cuda")
