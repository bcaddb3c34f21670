"""Transfer learning: start from a weights file, new head, optional freeze, head lr multiplier."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from toolbox.errors import UserError
from trainer.training.build import build_model
from trainer.training.config import load_config
from trainer.training.optim import make_optimizer, param_groups

SMALL = [
    "data.shards=s",
    "run.dir=r",
    "model.block_config=[2,2]",
    "model.growth_rate=4",
    "model.num_init_features=8",
    "model.small_inputs=true",
]


@pytest.fixture
def source_weights(tmp_path):
    config = load_config(None, SMALL)
    source = build_model(config, num_classes=5)
    path = tmp_path / "source.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    return source, path


def test_new_head_features_loaded_and_frozen(source_weights):
    source, path = source_weights
    config = load_config(
        None, SMALL + [f"model.pretrained={path}", "model.freeze_features=true", "optim.head_lr_mult=10"]
    )
    with pytest.warns(UserWarning, match="classifier"):
        model = build_model(config, num_classes=3)
    assert model.classifier.out_features == 3
    for name, tensor in source.features.state_dict().items():
        assert torch.equal(model.features.state_dict()[name], tensor), name
    assert not any(p.requires_grad for p in model.features.parameters())
    groups = param_groups(model, config.optim, model.classifier)
    optimizer = make_optimizer(groups, config.optim)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.classifier.parameters()}
    assert {g["lr"] for g in optimizer.param_groups} == {config.optim.lr * 10}


def test_weights_of_an_unrelated_model_are_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    config = load_config(None, SMALL + [f"model.pretrained={path}"])
    with pytest.raises(UserError, match="shares no weights"):
        build_model(config, num_classes=3)


class RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", r"cannot be used \("),
        (b"PK\x03\x04 not really a zip", r"cannot be used \("),
        (pickle.dumps({"w": RunsCode()}), r"cannot be used \(not a weights file, or one holding more than tensors\)"),
    ],
)
def test_a_pretrained_file_that_is_not_weights_is_one_line(tmp_path, capsys, content, reason):
    path = tmp_path / "densenet121.pth"
    path.write_bytes(content)
    config = load_config(None, SMALL + [f"model.pretrained={path}"])
    with pytest.raises(UserError, match=rf"^model.pretrained {path} {reason}.* — give a .pth or .safetensors DenseNet"):
        build_model(config, 10)
    assert "this ran" not in capsys.readouterr().out
