"""model/: parity with torchvision and timm, exact sizes, precision/layout/compile paths, pretrained loading.

    .venv/bin/python -m pytest -q tests/test_model.py            # ~1 min on 2 CPU cores
    RUN_SLOW=1 .venv/bin/python -m pytest -q tests/test_model.py # adds torch.compile with inductor
"""
import math
import os
import re

import pytest
import torch
import torchvision
from torch import nn

from model import MODEL_NAMES, create_model, load_pretrained
from model.__main__ import count, main
from model.mobilenetv3 import make_divisible

# Inductor compiles C++ for every kernel: ~3.5 min cold on 2 CPU cores, ~15 s with a warm cache.
slow = pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="slow; set RUN_SLOW=1 to run")

TV_BUILDERS = {"large": torchvision.models.mobilenet_v3_large, "small": torchvision.models.mobilenet_v3_small}


def randomize_bn(net: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN affine and running statistics, so parity covers eps and weight/bias order."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5
    return net


def images(n: int = 2, side_px: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side_px, side_px, generator=torch.Generator().manual_seed(seed))


# --- parity with torchvision -------------------------------------------------------------

@pytest.mark.parametrize("size", ["large", "small"])
def test_state_dict_moves_both_ways_and_logits_match_torchvision(size):
    x = images()
    torch.manual_seed(1)
    ours = randomize_bn(create_model(f"mobilenetv3_{size}_100"), seed=1).eval()
    tv = TV_BUILDERS[size]().eval()
    tv.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert (ours(x) - tv(x)).abs().max().item() < 1e-5

    torch.manual_seed(2)
    tv = randomize_bn(TV_BUILDERS[size](), seed=2).eval()
    ours = create_model(f"mobilenet_v3_{size}").eval()  # torchvision's spelling of the name
    ours.load_state_dict(tv.state_dict(), strict=True)
    with torch.no_grad():
        assert (ours(x) - tv(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("name, params", [
    ("mobilenetv3_large_100", 5_483_032),  # torchvision's count
    ("mobilenetv3_small_100", 2_542_856),
    ("mobilenetv3_large_075", 3_993_528),  # paper Table 3: 4.0M
    ("mobilenetv3_small_075", 2_041_872),  # paper Table 3: 2.0M
    ("mobilenetv3_large_050", 2_689_520),
    ("mobilenetv3_small_050", 1_592_704),
])
def test_parameter_counts(name, params):
    assert sum(p.numel() for p in create_model(name).parameters()) == params


def test_aliases_are_the_100_models_and_unknown_names_list_the_valid_ones():
    for alias, name in [("mobilenet_v3_large", "mobilenetv3_large_100"),
                        ("mobilenet_v3_small", "mobilenetv3_small_100")]:
        a, b = create_model(alias).state_dict(), create_model(name).state_dict()
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    with pytest.raises(ValueError, match="mobilenetv3_large_100.*mobilenet_v3_small"):
        create_model("mobilenetv3_large")


# --- the paper's settings ------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n.startswith("mobilenetv3_")])
def test_width_multiplier_gives_channels_divisible_by_8(name):
    width = int(name[-3:]) / 100
    net = create_model(name, num_classes=10)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            assert m.in_channels == 3 or m.in_channels % 8 == 0, m
            assert m.out_channels % 8 == 0, m
    # The multiplier reaches the network: the last conv is 960 (Large) or 576 (Small) times it.
    last_conv = 960 if "large" in name else 576
    assert net.classifier[0].in_features == make_divisible(last_conv * width)
    # The head stays at table width (the TF code's fine-grain mode that the paper's 0.75 uses).
    assert net.classifier[0].out_features == (1280 if "large" in name else 1024)


def test_make_divisible_rounds_to_8_and_never_loses_more_than_10_percent():
    assert [make_divisible(c) for c in (8, 12, 18, 54, 120, 184)] == [8, 16, 24, 56, 120, 184]
    for c in range(1, 2000):
        r = make_divisible(c * 0.75)
        assert r % 8 == 0 and r >= 0.9 * c * 0.75


def test_batchnorm_and_dropout_settings():
    net = create_model("mobilenetv3_small_100", dropout=0.3)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout)] == [0.3]
    net = create_model("mobilenetv3_small_100", bn_eps=1e-5)  # timm's
    assert all(m.eps == 1e-5 for m in net.modules() if isinstance(m, nn.BatchNorm2d))


# --- layouts, precision, compile -----------------------------------------------------------

def test_channels_last_forward_equals_contiguous_and_keeps_the_layout():
    torch.manual_seed(0)
    net = randomize_bn(create_model("mobilenetv3_large_100", num_classes=10), seed=0).eval()
    x = images()
    with torch.no_grad():
        expected = net(x)
        net = net.to(memory_format=torch.channels_last)
        conv_inputs = []
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_pre_hook(lambda m, args: conv_inputs.append(args[0]))
        got = net(x.to(memory_format=torch.channels_last))
    # A reshape or .contiguous() between layers would fall back to NCHW and cost a copy each
    # way; the next conv would hide it in the output, so look at what every conv is fed.
    assert len(conv_inputs) == sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in conv_inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenetv3_large_100", "mobilenetv3_small_100"])
def test_bf16_autocast_forward_backward_is_finite_and_reaches_every_parameter(name):
    torch.manual_seed(0)
    net = create_model(name, num_classes=10).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(images(n=4, side_px=64))
        loss = nn.functional.cross_entropy(logits, torch.arange(4))
    assert logits.dtype == torch.bfloat16  # autocast really ran the layers in bf16
    assert torch.isfinite(logits.float()).all() and torch.isfinite(loss)
    loss.backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def _train_step(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    net.zero_grad()
    loss = net(x).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in net.parameters()]


def test_compile_traces_without_graph_breaks_and_matches_eager():
    # aot_eager runs Dynamo and AOTAutograd (where graph breaks and autograd problems show up)
    # without generating C++; the inductor test below adds the code generation.
    torch.manual_seed(0)
    net = create_model("mobilenetv3_small_100", num_classes=10, dropout=0.0).train()
    x = images(n=4, side_px=64)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    # BN running stats update on every train-mode call, so take the eager step on a copy.
    twin = create_model("mobilenetv3_small_100", num_classes=10, dropout=0.0).train()
    twin.load_state_dict(net.state_dict())
    loss, grads = _train_step(compiled, x)
    loss_ref, grads_ref = _train_step(twin, x)
    torch.testing.assert_close(loss, loss_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


@slow
def test_compile_with_inductor_matches_eager():
    torch.manual_seed(0)
    net = randomize_bn(create_model("mobilenetv3_small_100", num_classes=10), seed=0).eval()
    x = images(side_px=64)
    compiled = torch.compile(net)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-5)
    net.train()
    compiled(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# --- pretrained weights --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tv_large_file(tmp_path_factory):
    """A torchvision-format weights file, as a user would download it (we never do)."""
    torch.manual_seed(3)
    tv = randomize_bn(torchvision.models.mobilenet_v3_large(), seed=3)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_large.pth"
    torch.save(tv.state_dict(), path)
    return path


def test_load_pretrained_same_classes_gives_torchvision_logits(tv_large_file):
    net = create_model("mobilenetv3_large_100").eval()
    msg = load_pretrained(net, tv_large_file, num_classes=1000)
    assert msg == (f"loaded {len(net.state_dict())} tensors from {tv_large_file} "
                   "(torchvision format, BatchNorm eps 0.001)")
    tv = torchvision.models.mobilenet_v3_large().eval()
    tv.load_state_dict(torch.load(tv_large_file, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(net(images()), tv(images()), rtol=0, atol=1e-5)


def test_load_pretrained_other_class_count_reinitialises_only_the_classifier(tv_large_file):
    file_sd = torch.load(tv_large_file, weights_only=True)
    net = create_model("mobilenetv3_large_100", num_classes=10)
    nn.init.constant_(net.classifier[3].weight, 5.0)  # stale values the loader must replace
    nn.init.constant_(net.classifier[3].bias, 5.0)
    msg = load_pretrained(net, tv_large_file, num_classes=10)
    assert msg == (f"loaded {len(file_sd) - 2} tensors from {tv_large_file} (torchvision format, "
                   "BatchNorm eps 0.001); classifier re-initialised for 10 classes (file has 1000)")
    ours = net.state_dict()
    for k, v in file_sd.items():
        if not k.startswith("classifier.3."):
            assert torch.equal(ours[k], v), k
    head = net.classifier[3]
    assert head.weight.shape == (10, 1280)
    assert torch.equal(head.bias, torch.zeros(10))
    assert 0.005 < head.weight.std().item() < 0.02  # init_weights' N(0, 0.01)


def test_load_pretrained_accepts_training_checkpoints(tv_large_file, tmp_path):
    file_sd = torch.load(tv_large_file, weights_only=True)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {f"module.{k}": v for k, v in file_sd.items()}, "epoch": 3}, path)
    net = create_model("mobilenetv3_large_100")
    load_pretrained(net, path, num_classes=1000)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in file_sd.items())


def test_load_pretrained_rejects_other_networks_naming_the_file(tv_large_file, tmp_path):
    small = tmp_path / "small.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), small)
    with pytest.raises(ValueError, match=re.escape(str(small)) + ".*missing.*unexpected"):
        load_pretrained(create_model("mobilenetv3_large_100"), small, num_classes=1000)
    with pytest.raises(ValueError, match=re.escape(str(tv_large_file)) + r".*another shape.*file \("):
        load_pretrained(create_model("mobilenetv3_large_075"), tv_large_file, num_classes=1000)
    junk = tmp_path / "notes.txt"
    junk.write_text("not weights")
    with pytest.raises(ValueError, match=re.escape(str(junk)) + ".*cannot read"):
        load_pretrained(create_model("mobilenetv3_small_100"), junk, num_classes=1000)
    nested = tmp_path / "nested.pt"
    torch.save({"epoch": 3, "weights": [1, 2]}, nested)
    with pytest.raises(ValueError, match=re.escape(str(nested)) + ".*expected a state_dict"):
        load_pretrained(create_model("mobilenetv3_small_100"), nested, num_classes=1000)


# --- FLOPs / params report -----------------------------------------------------------------

@pytest.mark.parametrize("name, paper_madds_m", [
    ("mobilenetv3_large_100", 219), ("mobilenetv3_small_100", 56),  # paper Table 3
    ("mobilenetv3_large_075", 155), ("mobilenetv3_small_075", 44),
])
def test_multiply_adds_at_224_match_the_paper(name, paper_madds_m):
    params, madds = count(name)
    # FlopCounterMode counts convs and linears; the paper's rounding and its counting of
    # small elementwise ops leave ~1% between them (torchvision publishes 0.217 G for Large).
    assert abs(madds / 1e6 - paper_madds_m) / paper_madds_m < 0.02, madds


def test_report_prints_params_and_multiply_adds(capsys):
    main(["mobilenetv3_small_100", "--image-size", "128", "--num-classes", "10"])
    out = capsys.readouterr().out
    params = int(re.search(r"params\s+([\d,]+)", out).group(1).replace(",", ""))
    madds = int(re.search(r"multiply-adds\s+([\d,]+)", out).group(1).replace(",", ""))
    net = create_model("mobilenetv3_small_100", num_classes=10)
    assert params == sum(p.numel() for p in net.parameters())
    # MAdds scale with pixels in the conv layers, so 128 px costs about (128/224)^2 of 224 px.
    assert 0.3 < madds / count("mobilenetv3_small_100", 224, 10)[1] < 0.35


# --- timm's weights and timm's stochastic depth ----------------------------------------------

@pytest.fixture(scope="module")
def timm():
    try:
        import timm
    except ModuleNotFoundError:
        pytest.fail("timm is a test dependency: pip install -r requirements.txt")
    return timm


def timm_random(timm, name: str, seed: int, **kwargs) -> nn.Module:
    """timm's own network (pretrained=False: nothing is downloaded) with random weights: non-zero
    biases and BN affines, and BN statistics measured on random images, so logits are O(1) and
    a 1e-5 comparison means something."""
    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False, **kwargs)
    g = torch.Generator().manual_seed(seed)
    for pname, p in net.named_parameters():
        if p.dim() == 1:  # biases (SE, head conv, classifier) and BN weight / bias
            p.data = torch.randn(p.shape, generator=g) * 0.1 + (1.0 if pname.endswith("weight") else 0.0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        net.train()(images(n=8, seed=seed + 100))
    return net.eval()


@pytest.fixture(scope="module", params=["mobilenetv3_large_100", "mobilenetv3_small_100"])
def timm_file(request, timm, tmp_path_factory):
    net = timm_random(timm, request.param, seed=4)
    path = tmp_path_factory.mktemp("timm") / f"{request.param}.pth"
    torch.save(net.state_dict(), path)
    return request.param, net, path


def test_timm_weights_load_and_give_timms_logits(timm_file):
    name, theirs, path = timm_file
    ours = create_model(name).eval()
    msg = load_pretrained(ours, path, num_classes=1000)
    assert msg == f"loaded {len(ours.state_dict())} tensors from {path} (timm format, BatchNorm eps 1e-05)"
    assert all(m.eps == 1e-5 for m in ours.modules() if isinstance(m, nn.BatchNorm2d))
    x = images()
    with torch.no_grad():
        expected = theirs(x)
        diff = (ours(x) - expected).abs().max().item()
        print(f"{name}: max |logit difference| vs timm {diff:.2e} (logits up to {expected.abs().max():.2f})")
        assert diff < 1e-5
        # The eps matters: with torchvision's 1e-3 the same weights give other logits.
        load_pretrained(ours, path, num_classes=1000, bn_eps=1e-3)
        assert (ours(x) - expected).abs().max().item() > 1e-4


def test_timm_weights_in_safetensors_and_with_a_new_classifier(timm_file, tmp_path):
    from safetensors.torch import save_file
    name, theirs, _ = timm_file
    path = tmp_path / "model.safetensors"  # the Hugging Face hub's file
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, path)
    ours = create_model(name, num_classes=10)
    msg = load_pretrained(ours, path, num_classes=10)
    assert msg.endswith("(timm format, BatchNorm eps 1e-05); classifier re-initialised for 10 classes "
                        "(file has 1000)")
    assert torch.equal(ours.classifier[0].weight, theirs.conv_head.weight.flatten(1))
    assert torch.equal(ours.features[0][0].weight, theirs.conv_stem.weight)


def test_timm_file_of_another_network_names_the_file(timm, tmp_path):
    path = tmp_path / "timm_small.pth"
    torch.save(timm.create_model("mobilenetv3_small_100", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r" does not hold .*\(timm format\).*missing"):
        load_pretrained(create_model("mobilenetv3_large_100"), path, num_classes=1000)
    # A layer MobileNetV3 does not have is reported under timm's own name.
    sd = torch.load(path, weights_only=True)
    sd["blocks.1.0.conv_extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"1 unexpected tensors \(e.g. blocks.1.0.conv_extra.weight\)"):
        load_pretrained(create_model("mobilenetv3_small_100"), path, num_classes=1000)
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"not weights")
    with pytest.raises(ValueError, match=re.escape(str(junk)) + ".*cannot read it as a safetensors file"):
        load_pretrained(create_model("mobilenetv3_small_100"), junk, num_classes=1000)


def _drop_probs(blocks) -> list[float]:
    """Per block, the probability its residual branch is dropped in training (0: never)."""
    out = []
    for b in blocks:
        dp = getattr(b, "drop_path", None)
        has_skip = getattr(b, "has_skip", getattr(b, "use_residual", False))
        p = getattr(dp, "drop_prob", getattr(dp, "p", 0.0)) if has_skip else 0.0
        out.append(float(p))
    return out


@pytest.mark.parametrize("name", ["mobilenetv3_large_100", "mobilenetv3_small_100"])
def test_drop_path_sits_where_timm_puts_it_and_drops_the_same_samples(timm, name, tmp_path):
    theirs = timm_random(timm, name, seed=5, drop_path_rate=0.2)
    torch.save(theirs.state_dict(), tmp_path / "timm.pth")
    ours = create_model(name, dropout=0.0, drop_path=0.2)
    load_pretrained(ours, tmp_path / "timm.pth", num_classes=1000)
    timm_blocks = [b for stage in theirs.blocks for b in stage]
    ours_blocks = list(ours.features)[1:]  # after the stem: the bnecks, then the last 1x1 conv
    expected = _drop_probs(timm_blocks)
    assert _drop_probs(ours_blocks) == pytest.approx(expected, abs=1e-12)
    n = len(expected)  # timm counts the last 1x1 conv as a block: rate 0.2 * i / n on residual ones
    assert n == (16 if "large" in name else 12) and max(expected) == pytest.approx(0.2 * (n - 2) / n)
    # Train mode: the same seed drops the same samples in both (BN then uses batch statistics).
    x = images(n=16, side_px=64)
    theirs.train()
    ours.train()
    torch.manual_seed(7)
    with torch.no_grad():
        t = theirs(x)
        torch.manual_seed(7)
        o = ours(x)
        torch.manual_seed(8)
        other = ours(x)
    torch.testing.assert_close(o, t, rtol=1e-4, atol=1e-5)
    assert (other - t).abs().max() > 1e-3  # the draws do change the output


def test_drop_path_keeps_the_expectation_and_is_off_in_eval():
    from model.mobilenetv3 import DropPath
    x = torch.ones(20000, 2, 2, 2)
    drop = DropPath(0.25).train()
    torch.manual_seed(0)
    y = drop(x)
    kept = y[:, 0, 0, 0]
    assert kept.unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert abs((kept == 0).double().mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 20000)
    assert torch.equal(y, y[:, :1, :1, :1].expand_as(y))  # one draw per sample
    assert drop.eval()(x) is x
    with pytest.raises(ValueError, match="--drop-path 1.0"):
        create_model("mobilenetv3_small_100", drop_path=1.0)
