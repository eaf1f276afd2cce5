"""The U-Net of METHOD.md §5: shapes, sizes, the split positional-encoding conv, frame checks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_mtml.model import UNet, count_parameters, positional_encoding


def _tiny(dims=2, frame=(32, 32), **kwargs):
    kwargs = {"base_features": 4, "max_features": 16, "depth": 3, "init_seed": 0, **kwargs}
    return UNet(dims, frame, **kwargs)


@pytest.mark.parametrize(
    "dims, frame, depth",
    [(2, (32, 48), 3), (3, (16, 16, 24), 3), (2, (64, 128), 7), (3, (16, 32, 16), 5)],
)
def test_forward_shape_and_dtype(dims, frame, depth):
    net = UNet(dims, frame, base_features=4, max_features=16, depth=depth, init_seed=1)
    x = torch.randn(2, 1, *frame)
    y = net(x)
    assert y.shape == (2, 1, *frame)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    # A regression head without activation: outputs of both signs.
    assert (y < 0).any() and (y > 0).any()


def test_paper_parameter_counts():
    # Measured with this design (see model.py): the paper states 13.9 M (3D) and 29.1 M (2D).
    # The count does not depend on the frame: small frames keep the test fast.
    net3 = UNet.paper(3, (16, 16, 32))
    net2 = UNet.paper(2, (64, 128))
    assert count_parameters(net3) == 13_889_600
    assert count_parameters(net2) == 29_124_704
    assert net3.widths == [32, 64, 128, 256, 320]
    assert net2.widths == [32, 64, 128, 256, 512, 512, 512]
    assert abs(count_parameters(net3) / 1e6 - 13.9) < 0.05
    assert abs(count_parameters(net2) / 1e6 - 29.1) < 0.05
    # The issue's reference figure for the authors' 6-stage 2D net (17.3 M) matches too.
    assert abs(count_parameters(UNet(2, (32, 64), depth=6)) / 1e6 - 17.3) < 0.05
    # The first conv sees 1 + n + 64 channels.
    assert net3.encoder[0][0].conv.in_channels == 68
    assert net2.encoder[0][0].conv.in_channels == 67


def test_light_preset_is_lighter_and_rebuildable():
    paper = UNet.paper(3, (16, 16, 32))
    light = UNet.light(3, (16, 16, 32))
    assert light.base_features == 16
    assert count_parameters(light) == 3_488_800
    assert count_parameters(UNet.light(2, (64, 128))) == 7_290_928
    assert count_parameters(light) < count_parameters(paper) / 3
    kwargs = light.model_kwargs()
    rebuilt = UNet(**kwargs)
    assert rebuilt.model_kwargs() == kwargs
    assert count_parameters(rebuilt) == count_parameters(light)
    # The encoding is a function of the frame: it is not saved with the weights.
    assert "encoding" not in light.state_dict()
    assert rebuilt.load_state_dict(light.state_dict()) is not None


def test_positional_encoding_values():
    enc = positional_encoding((8, 12))
    assert enc.shape == (2 + 64, 8, 12) and enc.dtype == np.float32
    np.testing.assert_allclose(enc[0, :, 0], np.linspace(-1, 1, 8), atol=1e-7)
    np.testing.assert_allclose(enc[1, 0, :], np.linspace(-1, 1, 12), atol=1e-7)
    # sin^2 + cos^2 = 1 for every Fourier feature, and the matrix is fixed (seed 42).
    np.testing.assert_allclose(enc[2:34] ** 2 + enc[34:] ** 2, 1.0, atol=1e-5)
    b = np.random.default_rng(42).standard_normal((32, 2)) * 12
    phase = 2 * np.pi * (b[5, 0] * 3 / 8 + b[5, 1] * 7 / 12)
    assert enc[2 + 5, 3, 7] == pytest.approx(np.sin(phase), abs=1e-5)
    np.testing.assert_array_equal(enc, positional_encoding((8, 12)))
    assert positional_encoding((4, 8, 8)).shape == (3 + 64, 4, 8, 8)


@pytest.mark.parametrize("dims, frame", [(2, (32, 32)), (3, (8, 16, 16))])
def test_split_first_conv_equals_full_conv(dims, frame):
    net = _tiny(dims, frame)
    x = torch.randn(3, 1, *frame, generator=torch.Generator().manual_seed(11))
    conv = net.encoder[0][0].conv
    full_input = torch.cat([x, net.encoding.expand(3, *net.encoding.shape[1:])], dim=1)
    reference = conv(full_input)
    with torch.no_grad():
        split = net._first_conv(x)
    np.testing.assert_allclose(split.numpy(), reference.detach().numpy(), atol=1e-5, rtol=1e-5)
    # The whole model, split vs naive, in float32 (outputs of a few units: float32 rounding of
    # the two sums reaches ~1e-5, so the tolerance is relative too) and float64.
    net.split_encoding = False
    naive = net(x)
    net.split_encoding = True
    np.testing.assert_allclose(
        net(x).detach().numpy(), naive.detach().numpy(), atol=1e-5, rtol=1e-5
    )
    net64 = net.double()
    a = net64(x.double())
    net64.split_encoding = False
    b = net64(x.double())
    np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), atol=1e-10)


def test_split_gradients_equal_naive_gradients():
    net = _tiny()
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 1, 32, 32, generator=gen)
    target = torch.rand(2, 1, 32, 32, generator=gen)
    grads = []
    for split in (True, False):
        net.zero_grad()
        net.split_encoding = split
        F.mse_loss(net(x), target).backward()
        grads.append(net.encoder[0][0].conv.weight.grad.clone())
    np.testing.assert_allclose(grads[0].numpy(), grads[1].numpy(), atol=1e-6, rtol=1e-4)


def test_encoding_cache_follows_weight_changes():
    net = _tiny().eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        first = net(x)
        assert net._encoding_cache is not None
        again = net(x)
        torch.testing.assert_close(first, again)
        # An in-place weight change (as an optimiser step does) must invalidate the cache.
        net.encoder[0][0].conv.weight.add_(0.1)
        changed = net(x)
        net._encoding_cache = None
        fresh = net(x)
    torch.testing.assert_close(changed, fresh)
    assert not torch.allclose(first, changed)
    # So must loading other weights (a checkpoint) into the model.
    other = _tiny(init_seed=5).eval()
    with torch.no_grad():
        net(x)
        net.load_state_dict(other.state_dict())
        torch.testing.assert_close(net(x), other(x))
    # Training with gradients never uses a stale cached term.
    net.train()
    out = net(x)
    assert out.requires_grad and net._encoding_cache is None


def test_frame_checks():
    with pytest.raises(ValueError, match="multiple of 2\\*\\*\\(depth-1\\) = 64"):
        UNet(2, (256, 200), depth=7)
    with pytest.raises(ValueError, match="multiple of 2\\*\\*\\(depth-1\\) = 16"):
        UNet.paper(3, (80, 112, 81))
    with pytest.raises(ValueError, match="3 axes but dims=2"):
        UNet(2, (32, 32, 32))
    with pytest.raises(ValueError, match="needs a fixed frame"):
        UNet(2, None)
    with pytest.raises(ValueError, match="single voxel"):
        UNet(2, (64, 64), depth=7)
    with pytest.raises(ValueError, match="dims must be 2 or 3"):
        UNet(4, (16, 16, 16, 16))
    net = _tiny()
    with pytest.raises(ValueError, match="tied to the frame \\(32, 32\\)"):
        net(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="\\(batch, 1, \\*spatial\\)"):
        net(torch.randn(1, 2, 32, 32))
    with pytest.raises(ValueError, match="\\(batch, 1, \\*spatial\\)"):
        net(torch.randn(32, 32))
    # Without the encoding any divisible size is accepted, others are refused.
    free = UNet(2, None, base_features=4, max_features=8, depth=3, pos_encoding=False)
    assert free(torch.randn(1, 1, 16, 24)).shape == (1, 1, 16, 24)
    with pytest.raises(ValueError, match="multiple"):
        free(torch.randn(1, 1, 16, 22))


def test_no_encoding_variant_has_one_input_channel():
    net = _tiny(pos_encoding=False)
    assert net.encoder[0][0].conv.in_channels == 1
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 1, 32, 32)


def test_deterministic_init_under_seed():
    a = _tiny(init_seed=7).state_dict()
    b = _tiny(init_seed=7).state_dict()
    c = _tiny(init_seed=8).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and "conv" in k)
    # The biases start at zero, the norms at identity.
    assert torch.count_nonzero(a["encoder.0.0.conv.bias"]) == 0
    assert torch.all(a["encoder.0.0.norm.weight"] == 1)


def test_optimiser_steps_lower_the_mse():
    torch.manual_seed(0)  # only for the test's own data
    net = _tiny(frame=(16, 16), init_seed=3)
    x = torch.randn(2, 1, 16, 16)
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:8, 5:10] = 0.8
    opt = torch.optim.AdamW(net.parameters(), lr=5e-3, weight_decay=0)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.mse_loss(net(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_autocast_bfloat16_on_cpu():
    net = _tiny(dims=3, frame=(8, 16, 16))
    x = torch.randn(2, 1, 8, 16, 16, generator=torch.Generator().manual_seed(13))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
        F.mse_loss(y.float(), torch.zeros_like(x)).backward()
    assert y.shape == x.shape and torch.isfinite(y.float()).all()
    assert net.encoder[0][0].conv.weight.grad is not None
    ref = net(x)
    # bf16 keeps about 3 significant digits.
    assert torch.allclose(y.float(), ref, atol=0.1 * float(ref.abs().max()) + 1e-3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        net.eval()
        assert torch.isfinite(net(x).float()).all()
        assert torch.isfinite(net(x).float()).all()  # from the cache


def test_inputs_are_not_mutated():
    net = _tiny()
    x = torch.randn(2, 1, 32, 32)
    before = x.clone()
    net(x)
    torch.testing.assert_close(x, before)


def test_works_under_distributed_data_parallel(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        net = _tiny(frame=(16, 16))
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        x = torch.randn(2, 1, 16, 16)
        for _ in range(2):  # every parameter, the split first conv's included, gets a gradient
            opt.zero_grad()
            F.mse_loss(ddp(x), torch.zeros_like(x)).backward()
            opt.step()
        assert all(p.grad is not None for p in net.parameters())
        ddp.eval()
        with torch.no_grad():
            assert ddp(x).shape == x.shape
    finally:
        dist.destroy_process_group()


def test_model_built_under_inference_mode_runs():
    """Inference tensors keep no version counter: the encoding cache must not need one."""
    with torch.inference_mode():
        net = UNet(2, (32, 32), base_features=4, max_features=8, depth=3, init_seed=0)
        x = torch.ones(2, 1, 32, 32)
        a, b = net(x), net(x)
    assert torch.equal(a, b) and a.shape == (2, 1, 32, 32)


def test_models_of_one_frame_share_one_encoding():
    a = UNet(2, (32, 32), base_features=4, max_features=8, depth=3, init_seed=0)
    b = UNet(2, (32, 32), base_features=4, max_features=8, depth=3, init_seed=1)
    assert a.encoding.data_ptr() == b.encoding.data_ptr()  # built once, shared
    np.testing.assert_array_equal(a.encoding[0].numpy(), positional_encoding((32, 32)))
    c = UNet(2, (64, 32), base_features=4, max_features=8, depth=3)
    assert tuple(c.encoding.shape) == (1, 66, 64, 32)


@pytest.mark.parametrize("dims, frame", [(2, (32, 48)), (3, (16, 16, 24))])
def test_forward_without_a_graph_equals_the_graph_forward(dims, frame):
    # Without gradients the norm and GELU run in place and the head is one matrix product:
    # the same function as the autograd path (which keeps torch's own modules) to rounding.
    net = _tiny(dims, frame)
    x = torch.randn(3, 1, *frame, generator=torch.Generator().manual_seed(4))
    with_graph = net(x)
    assert with_graph.requires_grad
    with torch.inference_mode():
        without = net(x)
    torch.testing.assert_close(without, with_graph.detach(), rtol=1e-4, atol=1e-4)
    h = torch.randn(2, net.widths[0], *frame, generator=torch.Generator().manual_seed(14))
    torch.testing.assert_close(net._head(h), net.head(h), rtol=1e-5, atol=1e-5)


def test_in_place_norm_matches_instance_norm_and_gelu():
    from napari_mtml.model import _instance_norm_gelu_

    gen = torch.Generator().manual_seed(2)
    norm = torch.nn.InstanceNorm3d(5, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(5, generator=gen) + 0.5)
        norm.bias.copy_(torch.randn(5, generator=gen))
    h = torch.randn(2, 5, 6, 7, 8, generator=gen) * 3.0 + 1.5
    with torch.no_grad():
        torch.testing.assert_close(_instance_norm_gelu_(h.clone(), norm), F.gelu(norm(h)))
        # an offset far above the spread (a one-pass variance would lose it to cancellation):
        # as close to the float64 result as torch's own instance norm
        h = torch.randn(2, 5, 6, 7, 8, generator=gen) * 0.01 + 300.0
        truth = F.gelu(norm.double()(h.double()))
        norm.float()
        ours = (_instance_norm_gelu_(h.clone(), norm).double() - truth).abs().max()
        torchs = (F.gelu(norm(h)).double() - truth).abs().max()
    assert ours <= 3 * torchs + 1e-6  # a one-pass variance: 2000x worse here


@pytest.mark.parametrize(
    "shape",
    [(1, 3, 5, 7, 4), (2, 2, 1, 3, 2), (3, 4, 6, 5), (1, 1, 1, 1)],
)
def test_upsample2_cat_equals_interpolate_then_cat(shape):
    # the decoder's joined input without a graph: x2 (bi|tri)linear upsampling, align_corners
    # False, then the skip; sizes of one included (the edge repeated)
    from napari_mtml.model import _upsample2_cat

    gen = torch.Generator().manual_seed(7)
    h = torch.randn(*shape, generator=gen)
    skip = torch.randn(shape[0], 5, *(2 * s for s in shape[2:]), generator=gen)
    mode = "trilinear" if len(shape) == 5 else "bilinear"
    want = torch.cat(
        [F.interpolate(h, size=skip.shape[2:], mode=mode, align_corners=False), skip], dim=1
    )
    got = _upsample2_cat(h, skip)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_direct_onednn_only_for_3d_float32_without_a_graph():
    from napari_mtml.model import _conv_nd, _direct_onednn

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 1, 3, 3, 3, generator=gen)
    b = torch.randn(6, generator=gen)
    # a batch of one with one channel: torch's own choice is its reference convolution
    x = torch.randn(1, 1, 8, 10, 6, generator=gen)
    with torch.inference_mode():
        assert torch.backends.mkldnn.is_available() == _direct_onednn(x, w)
        torch.testing.assert_close(
            _conv_nd(x, w, b), F.conv3d(x, w, b, padding=1), rtol=1e-5, atol=1e-5
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not _direct_onednn(x, w)  # autocast keeps torch's dispatch
        assert not _direct_onednn(x[:, :, 0], w[:, :, 0])  # 2D: torch's choice
        assert not _direct_onednn(x.double(), w.double())
    wg = w.clone().requires_grad_(True)
    assert not _direct_onednn(x, wg)  # training
    # strided (the first conv of a stage) too
    x4 = torch.randn(1, 4, 8, 10, 6, generator=gen)
    w4 = torch.randn(5, 4, 3, 3, 3, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(
            _conv_nd(x4, w4, None, stride=2),
            F.conv3d(x4, w4, None, stride=2, padding=1),
            rtol=1e-5,
            atol=1e-5,
        )


def test_3d_batch_of_one_without_a_graph_equals_the_graph_forward():
    # a batch of one is where torch's dispatch and the direct oneDNN call differ
    net = _tiny(3, (16, 24, 16), depth=4, max_features=32)
    x = torch.randn(1, 1, 16, 24, 16, generator=torch.Generator().manual_seed(5))
    with_graph = net(x)
    with torch.inference_mode():
        without = net(x)
    torch.testing.assert_close(without, with_graph.detach(), rtol=1e-4, atol=1e-4)
