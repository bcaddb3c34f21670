"""model.pretrained=imagenet and fetch_weights, with a torchvision-shaped weights file placed in a
temporary TORCH_HOME under the name torchvision gives it, and no network: every download attempt
fails at once, as on a compute node without internet."""

import hashlib
import re
import threading
import urllib.error
from types import SimpleNamespace

import pytest
import torch
import torchvision

from tests.conftest import wait_for
from toolbox import lock
from toolbox.errors import UserError
from trainer.training import imagenet
from trainer.training.build import build_model
from trainer.training.config import TORCHVISION_DENSENETS, ConfigError, load_config
from trainer.training.model import IMAGENET_DEPTHS

RUN = ["data.shards=s", "run.dir=r", "model.pretrained=imagenet", "data.normalize=imagenet"]
FILE = "densenet121-a639ec97.pth"  # torchvision's name for DenseNet121_Weights.IMAGENET1K_V1
FETCH_121 = "`python -m trainer.fetch_weights densenet121`"


class Said:
    """A Console that keeps its lines."""

    def __init__(self):
        self.lines = []

    def say(self, line):
        self.lines.append(line)


@pytest.fixture(scope="module")
def torchvision_121():
    """torchvision's densenet121 with random weights, BN statistics included (fresh ones would hide a
    mix-up of running_mean and running_var), in eval mode."""
    torch.manual_seed(0)
    model = torchvision.models.densenet121(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def downloads(tmp_path, monkeypatch):
    """An empty TORCH_HOME and no network: the list of URLs torch.hub tried to download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tried = []

    def no_network(url, dst, hash_prefix=None, progress=True):
        tried.append(url)
        raise urllib.error.URLError("[Errno -3] no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tried


@pytest.fixture
def cached(downloads, torchvision_121):
    """torchvision_121's weights in the cache as torchvision's file holds them (pre-0.4 key names, no
    num_batches_tracked)."""
    path = imagenet.cache_dir() / FILE
    path.parent.mkdir(parents=True)
    old_names = re.compile(r"(denselayer\d+\.(?:norm|conv))([12])\.")
    state = torchvision_121.state_dict()
    torch.save({old_names.sub(r"\1.\2.", k): v for k, v in state.items() if "num_batches" not in k}, path)
    return path


def test_the_se_off_model_gives_torchvision_outputs_and_a_fresh_head(cached, torchvision_121):
    said = Said()
    model = build_model(load_config(None, RUN + ["model.se=false"]), num_classes=10, console=said).eval()
    assert said.lines == [
        "initialised from torchvision's densenet121 ImageNet weights: 604 tensors loaded, 2 left at init (new head), "
        "0 ignored"
    ]
    assert not model.classifier.bias.any()  # the head is ours: 10 classes, at init
    reference = torchvision.models.densenet121(weights=None).eval()
    reference.load_state_dict(torchvision_121.state_dict())
    reference.classifier = model.classifier
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)


def test_se_layers_and_the_small_stem_start_fresh(cached, torchvision_121):
    said = Said()
    model = build_model(load_config(None, RUN + ["model.small_inputs=true"]), num_classes=3, console=said)
    assert "left at init (new head, SE, small stem)" in said.lines[0]
    ours, theirs = model.state_dict(), torchvision_121.state_dict()
    assert ours["features.conv0.weight"].shape == (64, 3, 3, 3) and "features.norm0.weight" not in ours
    shared = [k for k in theirs if k.startswith("features.denseblock") or k.startswith("features.transition")]
    assert shared and all(torch.equal(ours[k], theirs[k]) for k in shared)
    assert any(k.endswith(".se.fc1.weight") for k in ours)


def test_manifest_normalization_gets_a_note(cached):
    said = Said()
    build_model(load_config(None, RUN + ["data.normalize=manifest"]), num_classes=3, console=said)
    assert said.lines[-1].startswith("note: the ImageNet weights saw inputs normalised with ImageNet's mean and std")
    assert said.lines[-1].endswith("data.normalize=imagenet matches them")


def test_without_the_file_and_without_network_one_line_names_the_fetch_command(downloads):
    with pytest.raises(UserError) as raised:
        build_model(load_config(None, RUN), num_classes=3, console=Said())
    assert str(raised.value) == (
        f"model.pretrained=imagenet needs torchvision's densenet121 ImageNet weights, which are not in the cache "
        f"({imagenet.cache_dir()}) and cannot be downloaded here (<urlopen error [Errno -3] no network in tests>) — "
        f"run {FETCH_121} on a machine with internet (a login node), with the same TORCH_HOME"
    )
    assert downloads == ["https://download.pytorch.org/models/densenet121-a639ec97.pth"]


def test_a_torn_cached_file_is_one_line_naming_it_and_the_fix(cached, downloads):
    cached.write_bytes(cached.read_bytes()[:1000])
    with pytest.raises(
        UserError, match=rf"^the cached ImageNet weights {cached} cannot be read \(.+\) — delete the file"
    ):
        build_model(load_config(None, RUN), num_classes=3, console=Said())
    assert not downloads


@pytest.mark.parametrize("holder_fetched", [True, False])
def test_a_process_waits_for_the_one_fetching_then_reads_its_file_or_its_failure(
    downloads, torchvision_121, holder_fetched
):
    """Another process holds the lock beside the file (a rank downloading): this one says whom it waits
    for, then reads the file it left, or stops with the line its failed download left, not trying again."""
    path = imagenet.cache_dir() / FILE
    path.parent.mkdir(parents=True)
    lock_file = open(f"{path}.lock", "a+b")  # another open file description: flock conflicts as across processes
    assert lock.flock(lock_file.fileno()) is None
    lock.hold(lock_file.fileno())
    said, outcome = Said(), {}

    def waiter():
        try:
            outcome["state"] = imagenet.imagenet_state_dict(121, said)
        except UserError as e:
            outcome["error"] = str(e)

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        holder = wait_for(lambda: said.lines, timeout=60)
    finally:
        if holder_fetched:
            torch.save(torchvision_121.state_dict(), path)
        else:
            lock_file.truncate(0)
            lock_file.write(b'{"failed": "the line the holder said"}')
            lock_file.flush()
        lock_file.close()  # releases the lock
        thread.join(timeout=60)
    assert holder[0].startswith(f"waiting for host {lock.holder()['host']}, pid ") and holder[0].endswith(FILE)
    assert not downloads
    if holder_fetched:
        assert torch.equal(outcome["state"]["features.conv0.weight"], torchvision_121.features.conv0.weight)
    else:
        assert outcome == {"error": "the line the holder said"}


def test_a_process_that_does_not_wait_tries_itself_and_leaves_its_failure_for_the_waiters(downloads):
    path = imagenet.cache_dir() / FILE
    path.parent.mkdir(parents=True)
    (path.parent / f"{FILE}.lock").write_text('{"failed": "an earlier job\'s failure"}')
    with pytest.raises(UserError, match="cannot be downloaded here"):
        imagenet.imagenet_state_dict(121, Said())
    assert len(downloads) == 1
    assert "cannot be downloaded here" in (path.parent / f"{FILE}.lock").read_text()


@pytest.mark.parametrize(
    "overrides, error",
    [
        (["model.depth=264"], "torchvision has ImageNet weights for model.depth 121, 161, 169, 201, not 264 — set"),
        (
            ["model.depth=40", "model.small_inputs=true"],
            "torchvision has ImageNet weights for model.depth 121, 161, 169, 201, not 40",
        ),
        (["model.growth_rate=24"], "loads torchvision's densenet121, whose model.growth_rate is 32, not 24 — leave"),
        (["model.depth=161", "model.growth_rate=32"], "densenet161, whose model.growth_rate is 48, not 32"),
        (["model.block_config=[2,2]"], "whose model.block_config is [6, 12, 24, 16], not [2, 2]"),
        (["model.num_init_features=32"], "whose model.num_init_features is 64, not 32"),
        (["model.bn_size=2"], "whose model.bn_size is 4, not 2"),
        (["model.compression=0.7"], "whose model.compression is 0.5, not 0.7"),
    ],
)
def test_what_torchvision_does_not_ship_is_one_line_at_validation(overrides, error):
    with pytest.raises(ConfigError, match=re.escape(error)):
        load_config(None, RUN + overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.small_inputs=true", "model.se=false", "model.drop_rate=0.1"],
        ["model.depth=161", "model.growth_rate=48", "model.num_init_features=96"],
        ["model.depth=201", "model.block_config=[6,12,48,32]", "model.freeze_features=true"],
    ],
)
def test_torchvision_shaped_settings_validate(overrides, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", None)  # validation never downloads
    assert load_config(None, RUN + overrides).model.pretrained == "imagenet"


def test_the_config_knows_torchvision_s_densenets():
    for depth, (blocks, growth, init) in TORCHVISION_DENSENETS.items():
        assert IMAGENET_DEPTHS[depth] == (tuple(blocks), growth, init)
        assert imagenet.torchvision_weights(depth).url.endswith(".pth")
        assert imagenet.torchvision_weights(depth).meta["num_params"] > 7_000_000


# ----------------------------------------------------------------------------- fetch_weights


@pytest.mark.parametrize("name", ["densenet121", "DenseNet-121", "121", " densenet_121"])
def test_fetch_weights_takes_a_name_or_a_depth(name):
    assert imagenet.parse_depth(name) == 121


@pytest.mark.parametrize("name", ["densenet40", "resnet50", "264", ""])
def test_fetch_weights_refuses_what_torchvision_does_not_ship(name):
    with pytest.raises(UserError, match=r"give one of densenet121, densenet161, densenet169, densenet201"):
        imagenet.parse_depth(name)


def test_fetch_weights_without_network_is_one_line(downloads, capsys):
    assert imagenet.main(["--config", "configs/densenet121-imagenet.yaml", "model.depth=169"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert (
        len(err) == 1
        and "densenet169 ImageNet weights" in err[0]
        and "python -m trainer.fetch_weights densenet169" in err[0]
    )


def test_fetch_weights_checks_a_cached_file_against_the_hash_in_its_name(cached, capsys):
    assert imagenet.main(["densenet121"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cached} does not match the sha256 in its name (it starts ")
    assert err.rstrip().endswith(f"delete it and run {FETCH_121} again")


def test_fetch_weights_prints_where_a_good_cached_file_is(cached, monkeypatch, capsys):
    """A file whose name carries its own sha256 prefix stands in for torchvision's (whose prefix no
    test file can match): torchvision's weights entry is swapped for one that names it."""
    prefix = hashlib.sha256(cached.read_bytes()).hexdigest()[:8]
    named = cached.rename(cached.with_name(f"densenet121-{prefix}.pth"))
    url = f"https://download.pytorch.org/models/{named.name}"
    entry = SimpleNamespace(url=url, get_state_dict=lambda **kw: torch.hub.load_state_dict_from_url(url, **kw))
    monkeypatch.setattr(imagenet, "torchvision_weights", lambda depth: entry)
    assert imagenet.main(["121"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"densenet121: {named} (") and out[0].endswith(" MiB, sha256 checked)")


def test_fetch_weights_for_a_config_of_another_depth_is_one_line(downloads, capsys):
    assert imagenet.main(["--config", "configs/demo.yaml"]) == 2
    assert capsys.readouterr().err == (
        "error: configs/demo.yaml has model.depth=40, for which torchvision has no ImageNet weights — pass "
        "model.depth=121 (or 161, 169, 201), or name the model: `python -m trainer.fetch_weights densenet121`\n"
    )
    assert not downloads
