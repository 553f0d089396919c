"""The one device resolution."""

import pytest
import torch

from tread_scale.devices import composer_device, resolve_device
from tread_scale.errors import ConfigError


def test_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert composer_device(torch.device("cpu")) == "cpu" and composer_device(torch.device("cuda", 1)) == "gpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize("name", ["gpu", "cuda", "cuda:1"], ids=["composer_gpu", "cuda", "cuda_index"])
def test_cuda_without_a_gpu_names_the_setting(name):
    with pytest.raises(ConfigError, match=f"train.device={name} but no CUDA device is visible"):
        resolve_device(name, setting="train.device")


def test_nonsense_is_a_config_error():
    with pytest.raises(ConfigError, match="--device='tpu9' is not a device"):
        resolve_device("tpu9")
