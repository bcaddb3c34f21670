"""SE-DenseNet invariants: equals torchvision's DenseNet with SE off (structure, parameter count,
weights, outputs), efficient equals plain (eager and compiled, with less memory; compiled, no convolution runs twice), every named depth
builds, and load_weights refuses what does not fit with a one-line error."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from functorch.compile import min_cut_rematerialization_partition
from safetensors.torch import save_file
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop
from torch.distributed._tools.mem_tracker import MemTracker

from trainer.training.model import (
    IMAGENET_DEPTHS,
    SEDenseNet,
    data_defaults,
    load_weights,
    se_densenet,
    se_densenet121,
    se_densenet161,
    se_densenet169,
    se_densenet201,
    se_densenet264,
    se_densenet_bc100,
)

TORCHVISION_DEPTHS = (121, 161, 169, 201)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_params(block_config, k, init, bn_size=4, num_classes=1000, se_reduction=None) -> int:
    """DenseNet-BC parameter count from the paper's recipe (ImageNet stem), independent of the code."""
    n = 3 * 7 * 7 * init + 2 * init
    c = init
    for i, layers in enumerate(block_config):
        for _ in range(layers):
            n += 2 * c + c * bn_size * k + 2 * bn_size * k + bn_size * k * k * 9
            if se_reduction:
                h = max(1, k // se_reduction)
                n += 2 * k * h + h + k
            c += k
        if i < len(block_config) - 1:
            n += 2 * c + c * (c // 2)
            c //= 2
    return n + 2 * c + c * num_classes + num_classes


def tiny(**kwargs) -> SEDenseNet:
    """A two-block CIFAR-style model that runs in milliseconds on CPU."""
    args = dict(block_config=(3, 3), growth_rate=8, num_init_features=16, small_inputs=True, num_classes=5)
    return se_densenet(**{**args, **kwargs})


@pytest.fixture(scope="module")
def tv121():
    torch.manual_seed(0)
    return torchvision.models.densenet121(weights=None).eval()


def test_densenet121_parameter_count():
    assert num_params(se_densenet(121, se=False)) == 7_978_856


@pytest.mark.parametrize("depth", sorted(IMAGENET_DEPTHS))
def test_named_depth_matches_torchvision_structure(depth):
    model = se_densenet(depth, se=False)
    block_config, k, init = IMAGENET_DEPTHS[depth]
    assert num_params(model) == expected_params(block_config, k, init)
    for b, layers in enumerate(block_config, start=1):
        block = model.features.get_submodule(f"denseblock{b}")
        assert list(block.keys()) == [f"denselayer{i}" for i in range(1, layers + 1)]
    if depth in TORCHVISION_DEPTHS:
        tv = getattr(torchvision.models, f"densenet{depth}")(weights=None)
        ours = {k: v.shape for k, v in model.state_dict().items()}
        assert ours == {k: v.shape for k, v in tv.state_dict().items()}
        assert num_params(model) == num_params(tv)
    if depth in (121, 161):  # a forward pass for two of them; the rest only build, to keep CPU time low
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


@pytest.mark.parametrize("depth", [121, 169])
def test_se_adds_exactly_the_se_linears(depth):
    block_config, k, init = IMAGENET_DEPTHS[depth]
    off, on = num_params(se_densenet(depth, se=False)), num_params(se_densenet(depth, se=True))
    h = max(1, k // 16)
    assert on - off == sum(block_config) * (k * h + h + h * k + k)
    assert on == expected_params(block_config, k, init, se_reduction=16)


def _old_style(state_dict):
    """torchvision's pre-0.4 files: denselayer1.norm1.weight -> denselayer1.norm.1.weight, and no
    BN num_batches_tracked (it did not exist yet)."""
    pattern = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.")
    return {pattern.sub(r"\1.\2.", k): v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("style", ["current", "old_norm.1_keys"])
def test_loads_torchvision_weights_and_gives_same_outputs(tv121, tmp_path, style):
    sd = tv121.state_dict() if style == "current" else _old_style(tv121.state_dict())
    if style != "current":
        assert "features.denseblock1.denselayer1.norm.1.weight" in sd
    path = tmp_path / "densenet121.pth"
    torch.save(sd, path)
    model = se_densenet(121, se=False)
    report = load_weights(model, path)
    assert report.missing == [] and report.unexpected == [] and report.dropped == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        diff = (model.eval()(x) - tv121(x)).abs().max().item()
    assert diff < 1e-5


def test_unwraps_checkpoint_dict_and_ddp_prefix(tmp_path):
    src = tiny()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    dst = tiny()
    load_weights(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_se_model_takes_se_less_weights_non_strict(tv121):
    model = se_densenet(121, se=True)
    se_before = {k: v.clone() for k, v in model.state_dict().items() if ".se." in k}
    with pytest.raises(ValueError, match="strict=False"):
        load_weights(model, tv121.state_dict())
    report = load_weights(model, tv121.state_dict(), strict=False)
    assert report.missing and all(".se." in k for k in report.missing)
    assert sorted(report.missing) == sorted(se_before)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in se_before.items())
    assert torch.equal(state["features.conv0.weight"], tv121.state_dict()["features.conv0.weight"])


def test_classifier_of_other_shape_is_dropped_with_warning(tv121):
    model = se_densenet(121, num_classes=10, se=False)
    head = model.classifier.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"\(1000, 1024\).*\(10, 1024\)"):
        report = load_weights(model, tv121.state_dict())
    assert report.dropped == ["classifier.weight", "classifier.bias"]
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(model.classifier.weight, head)
    assert torch.equal(model.features.norm5.weight, tv121.features.norm5.weight)


def test_wrong_architecture_raises_one_line_and_leaves_model_alone():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = tiny(growth_rate=12).state_dict()
    with pytest.raises(
        ValueError, match=r"different architecture: features\.\S+ has shape file \(.*\) vs model \(.*\)"
    ) as err:
        load_weights(model, other)
    assert "\n" not in str(err.value)
    partial = {k: v for k, v in tiny().state_dict().items() if "denselayer3" not in k}
    with pytest.raises(ValueError, match="missing"):
        load_weights(model, partial)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(1)
    src = tiny().eval()
    path = tmp_path / "model.safetensors"
    save_file(src.state_dict(), str(path))
    dst = tiny().eval()
    load_weights(dst, path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def _peak_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of tensors alive during one forward + backward (weights, grads, activations
    and what selective checkpointing keeps aside), tracked by torch's MemTracker on CPU."""
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        model(x).sum().backward()
    return next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]


def _cifar(blocks: tuple[int, ...], efficient: bool) -> SEDenseNet:
    torch.manual_seed(0)
    return se_densenet(100, 5, block_config=blocks, small_inputs=True, efficient=efficient).train()


def _assert_same_training_step(a: torch.nn.Module, b: torch.nn.Module, run_a, run_b, x: torch.Tensor) -> None:
    """Outputs, every parameter's gradient and every BN running stat agree after one step."""
    target = torch.randint(0, 5, (len(x),))
    out_a, out_b = run_a(x), run_b(x)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    F.cross_entropy(out_a, target).backward()
    F.cross_entropy(out_b, target).backward()
    grads_b = dict(b.named_parameters())
    for name, p in a.named_parameters():
        torch.testing.assert_close(grads_b[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # The recomputation in backward must not update BN running stats a second time.
    buffers_b = dict(b.named_buffers())
    for name, buf in a.named_buffers():
        torch.testing.assert_close(buffers_b[name], buf, msg=name)


def test_efficient_equals_plain_and_needs_less_memory():
    plain, efficient = _cifar((8, 8), False), _cifar((8, 8), True)
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 32, 32)
    _assert_same_training_step(plain, efficient, plain, efficient, x)

    peak_plain, peak_efficient = _peak_bytes(_cifar((8, 8), False), x), _peak_bytes(_cifar((8, 8), True), x)
    print(f"peak: plain {peak_plain / 2**20:.1f} MiB, efficient {peak_efficient / 2**20:.1f} MiB")
    assert peak_efficient < 0.65 * peak_plain


def test_efficient_memory_grows_linearly_with_depth():
    """Each extra dense layer adds a constant number of bytes in efficient mode; with plain
    concatenation every layer stores its whole (growing) input, so the increments grow."""
    x = torch.randn(4, 3, 32, 32)

    def increments(efficient: bool) -> tuple[int, int]:
        b8, b16, b24 = (_peak_bytes(_cifar((n,), efficient), x) for n in (8, 16, 24))
        return b16 - b8, b24 - b16

    first, second = increments(efficient=True)
    assert second == pytest.approx(first, rel=0.05)
    first, second = increments(efficient=False)
    assert second > 1.3 * first


def _graph_recorder(graphs: dict):
    """A torch.compile backend that partitions like inductor (min-cut) and records both graphs."""

    def record(name: str):
        def compiler(gm: torch.fx.GraphModule, example_inputs):
            graphs[name] = gm
            return boxed_nop(gm, example_inputs)

        return compiler

    return aot_autograd(
        fw_compiler=record("forward"),
        bw_compiler=record("backward"),
        partition_fn=min_cut_rematerialization_partition,
        keep_inference_input_mutations=True,
    )


def _saved_for_backward_bytes(forward: torch.fx.GraphModule) -> int:
    outputs = next(n for n in forward.graph.nodes if n.op == "output").args[0]
    vals = [
        o.meta["val"] for o in outputs if isinstance(o, torch.fx.Node) and isinstance(o.meta.get("val"), torch.Tensor)
    ]
    return sum(v.untyped_storage().nbytes() for v in vals)


def test_efficient_compiled_equals_plain_and_recomputes_only_cheap_ops():
    torch._dynamo.reset()
    plain, efficient = _cifar((6, 6), False), _cifar((6, 6), True)
    efficient.load_state_dict(plain.state_dict())
    plain_graphs, efficient_graphs = {}, {}
    run_plain = torch.compile(plain, backend=_graph_recorder(plain_graphs))
    run_efficient = torch.compile(efficient, backend=_graph_recorder(efficient_graphs))
    _assert_same_training_step(plain, efficient, run_plain, run_efficient, torch.randn(8, 3, 32, 32))

    def forward_convolutions(gm: torch.fx.GraphModule) -> int:
        return sum(n.target == torch.ops.aten.convolution.default for n in gm.graph.nodes)

    assert forward_convolutions(efficient_graphs["backward"]) == 0
    assert forward_convolutions(plain_graphs["backward"]) == 0
    saved_plain = _saved_for_backward_bytes(plain_graphs["forward"])
    saved_efficient = _saved_for_backward_bytes(efficient_graphs["forward"])
    print(
        f"saved for backward, compiled: plain {saved_plain / 2**20:.1f} MiB, efficient {saved_efficient / 2**20:.1f} MiB"
    )
    assert saved_efficient < 0.7 * saved_plain
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "builder, depth",
    [(se_densenet121, 121), (se_densenet161, 161), (se_densenet169, 169), (se_densenet201, 201), (se_densenet264, 264)],
)
def test_each_named_builder_is_its_depth_with_imagenet_defaults(builder, depth):
    model = builder(num_classes=7)
    block_config, growth_rate, features = IMAGENET_DEPTHS[depth]
    assert model.arch["block_config"] == block_config and model.arch["growth_rate"] == growth_rate
    assert model.arch["num_init_features"] == features and model.data_config["input_size"] == 224
    assert model.fingerprint() == se_densenet(depth, num_classes=7).fingerprint()


def test_small_inputs_bc100_forward_backward():
    assert (
        se_densenet_bc100(num_classes=10).fingerprint()
        == se_densenet(100, 10, growth_rate=12, small_inputs=True).fingerprint()
    )
    model = se_densenet(100, num_classes=10, growth_rate=12, small_inputs=True)
    assert model.arch["block_config"] == (16, 16, 16) and model.arch["num_init_features"] == 24
    assert model.data_config["input_size"] == 32
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_se_reduction_guard_keeps_one_hidden_unit():
    model = tiny(growth_rate=4, se_reduction=16)
    se = model.features.denseblock1.denselayer1.se
    assert (se.fc1.in_features, se.fc1.out_features, se.fc2.out_features) == (4, 1, 4)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_dropout_random_in_train_deterministic_in_eval():
    torch.manual_seed(0)
    model = tiny(drop_rate=0.5)
    x = torch.randn(2, 3, 16, 16)
    assert not torch.equal(model.train()(x), model(x))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), model(x))


def test_data_defaults_num_features_and_reset_classifier():
    model = se_densenet(121, num_classes=10)
    assert model.data_config == data_defaults(False)
    assert model.data_config["input_size"] == 224 and model.data_config["crop_pct"] == 0.875
    assert model.data_config["mean"] == (0.485, 0.456, 0.406) and model.data_config["std"] == (0.229, 0.224, 0.225)
    assert model.num_features == 1024
    fp = model.fingerprint()
    assert fp == se_densenet(121, num_classes=10).fingerprint()
    assert fp != se_densenet(121, num_classes=10, se=False).fingerprint()
    model.reset_classifier(3)
    assert model.classifier.out_features == 3 and torch.count_nonzero(model.classifier.bias) == 0
    assert model.fingerprint() == se_densenet(121, num_classes=3).fingerprint() != fp
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(depth=50), "depth"),
        (dict(depth=99, small_inputs=True), "depth"),
        (dict(compression=0.0), "compression"),
        (dict(compression=1.5), "compression"),
        (dict(se_reduction=0), "se_reduction"),
        (dict(drop_rate=1.0), "drop_rate"),
        (dict(growth_rate=0), "growth_rate"),
        (dict(block_config=(6, 0)), "block_config"),
        (dict(num_classes=-1), "num_classes"),
    ],
)
def test_invalid_arguments_raise_one_line_value_error(kwargs, argument):
    with pytest.raises(ValueError, match=rf"^{argument} ") as err:
        se_densenet(**kwargs)
    assert "\n" not in str(err.value)


def test_init_follows_torchvision():
    model = tiny()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, torch.nn.Linear):
            assert torch.all(m.bias == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_weights(tiny(), model.state_dict())  # same shapes: no warning


@pytest.mark.parametrize("efficient", [False, True])
def test_shared_bn_compiled_equals_plain(efficient):
    """shared_bn normalises each feature map once for all later layers: compiled, it computes the
    plain model's outputs, gradients and BN running statistics (float64, so only rounding differs)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = se_densenet(100, 5, block_config=(4, 4), small_inputs=True).double().train()
    shared = se_densenet(100, 5, block_config=(4, 4), small_inputs=True, shared_bn=True, efficient=efficient)
    shared = shared.double().train()
    shared.load_state_dict(plain.state_dict())
    graphs: dict = {}
    run_shared = torch.compile(shared, backend=_graph_recorder(graphs))
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    for _ in range(2):  # the second step starts from the running stats the first one left
        _assert_same_training_step(plain, shared, plain, run_shared, x)

    # Compiled, no norm1 passes over its whole concatenated input any more: the channels put
    # through batch statistics drop from every layer's input width to each map's own width.
    def normalized_channels(model: torch.nn.Module, gm: torch.fx.GraphModule | None = None) -> int:
        if gm is None:
            return sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        return sum(
            n.args[0].meta["val"].shape[1]
            for n in gm.graph.nodes
            if "batch_norm" in str(n.target) and "backward" not in str(n.target)
        )

    print(
        f"channels through batch statistics: plain {normalized_channels(plain)}, "
        f"shared {normalized_channels(shared, graphs['forward'])}"
    )
    norm1 = sum(m.norm1.num_features for m in plain.modules() if hasattr(m, "norm1"))
    assert normalized_channels(plain) - normalized_channels(shared, graphs["forward"]) > 0.6 * norm1
    torch._dynamo.reset()
