"""Denoiser U-Net, autoencoder, FLOP counting and cross-attention control (tiny, CPU)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from CounterfactualGenLib.errors import InputError, ModelError

monai = pytest.importorskip("monai")

from CounterfactualGenLib.nets.attention import (  # noqa: E402
    AttentionControl,
    AttentionSite,
    ReplaceAttention,
    ReweightTokens,
    StoreAttention,
)
from CounterfactualGenLib.nets.autoencoder import build_autoencoder, default_autoencoder_config  # noqa: E402
from CounterfactualGenLib.nets.unet import build_denoiser, count_flops, default_denoiser_config  # noqa: E402

D_TEXT = 16


def _perturb(net: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """MONAI zero-initialises output/attention projections; perturb so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return net


@pytest.fixture(scope="module")
def latent_net():
    torch.manual_seed(0)
    return _perturb(build_denoiser(default_denoiser_config("latent", D_TEXT, "tiny"))).eval()


def _inputs(c: int, size: int = 8, b: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, size, size, size, generator=g), torch.rand(b, generator=g),
            torch.randn(b, 5, D_TEXT, generator=g))


# ---------------------------------------------------------------- denoiser


@pytest.mark.parametrize(("family", "channels"), [("wdm", 8), ("latent", 4)])
def test_denoiser_forward_shapes(family, channels):
    cfg = default_denoiser_config(family, D_TEXT, "tiny")
    assert cfg["in_channels"] == cfg["out_channels"] == channels
    net = build_denoiser(cfg)
    x, t, ctx = _inputs(channels)
    assert net(x, t, ctx).shape == x.shape
    assert net(x, torch.tensor(0.5), ctx).shape == x.shape  # scalar t broadcasts


def test_denoiser_requires_context_and_checks_shapes(latent_net):
    x, t, ctx = _inputs(4)
    with pytest.raises(InputError, match="context"):
        latent_net(x, t, None)
    with pytest.raises(InputError, match="context"):
        latent_net(x, t, torch.zeros(2, 5, D_TEXT + 1))
    with pytest.raises(InputError, match="multiple of 4"):
        latent_net(torch.zeros(2, 4, 6, 8, 8), t, ctx)
    with pytest.raises(InputError):
        latent_net(torch.zeros(2, 3, 8, 8, 8), t, ctx)


def test_time_maps_to_monai_timesteps(latent_net):
    x, t, ctx = _inputs(4)
    with torch.no_grad():
        ours = latent_net(x, t, ctx)
        ref = latent_net.unet(x, timesteps=t * 1000.0, context=ctx)
    assert torch.equal(ours, ref)


def test_config_is_json_and_rebuilds_identically():
    cfg = default_denoiser_config("wdm", D_TEXT, "small")
    text = json.dumps(cfg)
    net_a = build_denoiser(json.loads(text))
    assert net_a.config == cfg
    assert net_a.config["num_res_blocks"][-1] >= net_a.config["num_res_blocks"][0]  # deeper at low res
    assert cfg["attention_levels"][0] is False and cfg["attention_levels"][-1] is True
    with pytest.raises(ModelError, match="unknown"):
        build_denoiser({**cfg, "nonsense": 1})
    with pytest.raises(ModelError, match="multiple"):
        build_denoiser({**cfg, "norm_num_groups": 7})
    with pytest.raises(ModelError):
        default_denoiser_config("pixel", D_TEXT, "tiny")  # type: ignore[arg-type]


def test_state_dict_matches_plain_monai_unet():
    cfg = {**default_denoiser_config("latent", D_TEXT, "tiny"), "lowres_dropout": 0.3}
    net = build_denoiser(cfg)
    plain = monai.networks.nets.DiffusionModelUNet(
        spatial_dims=3, in_channels=4, out_channels=4, channels=cfg["channels"],
        attention_levels=cfg["attention_levels"], num_res_blocks=cfg["num_res_blocks"],
        num_head_channels=cfg["num_head_channels"], norm_num_groups=cfg["norm_num_groups"],
        with_conditioning=True, cross_attention_dim=D_TEXT,
    )
    assert [k.removeprefix("unet.") for k in net.state_dict()] == list(plain.state_dict())


def test_lowres_dropout_active_in_train_only():
    cfg = {**default_denoiser_config("latent", D_TEXT, "tiny"), "lowres_dropout": 0.5}
    torch.manual_seed(0)
    net = _perturb(build_denoiser(cfg))
    x, t, ctx = _inputs(4)
    hooked = [n for n, m in net.named_modules() if m._forward_pre_hooks]
    # only ResNet blocks of the lowest level (down + up) and of the middle block
    assert hooked and all(n.startswith(("unet.down_blocks.2", "unet.up_blocks.0", "unet.middle_block"))
                          for n in hooked)
    net.train()
    with torch.no_grad():
        assert not torch.equal(net(x, t, ctx), net(x, t, ctx))
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x, t, ctx), net(x, t, ctx))
    # a deep copy (EMA) follows its own train/eval flag, not the original's
    ema = copy.deepcopy(net).eval()
    net.train()
    with torch.no_grad():
        assert torch.equal(ema(x, t, ctx), ema(x, t, ctx))
    # without dropout, train and eval agree
    plain = _perturb(build_denoiser(default_denoiser_config("latent", D_TEXT, "tiny"))).train()
    with torch.no_grad():
        assert torch.equal(plain(x, t, ctx), plain.eval()(x, t, ctx))


def test_flash_attention_dropout_off_in_eval():
    cfg = {**default_denoiser_config("latent", D_TEXT, "tiny"), "use_flash_attention": True, "dropout_cattn": 0.5}
    torch.manual_seed(0)
    net = _perturb(build_denoiser(cfg))
    x, t, ctx = _inputs(4, b=1)
    with torch.no_grad():
        assert not torch.equal(net(x, t, ctx), net(x, t, ctx))  # training: attention dropout active
        net.eval()
        assert torch.equal(net(x, t, ctx), net(x, t, ctx))


def test_count_flops():
    conv = torch.nn.Conv3d(2, 3, 3, padding=1)
    assert count_flops(conv, (torch.zeros(1, 2, 4, 4, 4),)) == 2 * 2 * 3 * 27 * 64
    net = build_denoiser(default_denoiser_config("wdm", D_TEXT, "tiny"))
    x, t, ctx = _inputs(8, b=1)
    meta = count_flops(net, (x, t, ctx))
    assert meta > 0
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, t, ctx)
    assert counter.get_total_flops() == meta
    assert all(p.device.type == "cpu" for p in net.parameters())


# ---------------------------------------------------------------- autoencoder


def test_autoencoder_shapes_and_latent_scale():
    torch.manual_seed(0)
    ae = build_autoencoder(default_autoencoder_config("tiny"))
    assert ae.downsample_factor == 4 and ae.config["latent_channels"] == 4
    x = torch.randn(2, 1, 16, 16, 16)
    mu, logvar = ae.encode(x)
    assert mu.shape == logvar.shape == (2, 4, 4, 4, 4)
    z = ae.encode_latent(x, sample=False)
    assert torch.allclose(z, mu)
    z1 = ae.encode_latent(x, sample=True, generator=torch.Generator().manual_seed(3))
    z2 = ae.encode_latent(x, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(z1, z2) and not torch.equal(z1, z)
    assert ae.decode(z).shape == x.shape
    scale = ae.estimate_latent_scale([x])
    assert ae.config["latent_scale"] == scale == ae.latent_scale
    zs = ae.encode_latent(x)
    assert zs.std().item() == pytest.approx(1.0, rel=0.05)
    with torch.no_grad():
        assert torch.allclose(ae.decode(zs), ae.net.decode(mu), atol=1e-5)  # decode undoes the scale
    with pytest.raises(InputError, match="multiple of 4"):
        ae.encode(torch.zeros(1, 1, 10, 16, 16))
    assert json.loads(json.dumps(ae.config)) == ae.config


def test_autoencoder_overfit_step_reduces_loss():
    torch.manual_seed(0)
    ae = build_autoencoder(default_autoencoder_config("tiny"))
    x = torch.randn(1, 1, 8, 8, 8)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)

    def loss_fn():
        recon, mu, logvar = ae(x)
        return torch.nn.functional.l1_loss(recon, x) + 1e-6 * ae.kl_loss(mu, logvar)

    first = loss_fn().item()
    for _ in range(10):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.9 * first


# ---------------------------------------------------------------- cross-attention control


def _noop(probs, site):
    return probs


def test_attention_control_identity_and_restore(latent_net):
    cls = monai.networks.blocks.crossattention.CrossAttentionBlock
    blocks = [m for m in latent_net.modules() if isinstance(m, cls)]
    assert blocks
    x, t, ctx = _inputs(4)
    with torch.no_grad():
        ref = latent_net(x, t, ctx)
        with AttentionControl(latent_net, _noop):
            assert all("forward" in m.__dict__ for m in blocks)
            out = latent_net(x, t, ctx)
        assert (out - ref).abs().max().item() < 1e-6
        assert all("forward" not in m.__dict__ for m in blocks)
        with pytest.raises(RuntimeError, match="boom"), AttentionControl(latent_net, _noop):
            raise RuntimeError("boom")
        assert all("forward" not in m.__dict__ for m in blocks)
        assert torch.equal(latent_net(x, t, ctx), ref)


def test_attention_control_records_and_changes_output(latent_net):
    x, t, ctx = _inputs(4)
    store = StoreAttention()
    with torch.no_grad(), AttentionControl(latent_net, store):
        ref = latent_net(x, t, ctx)
        latent_net(x, t, ctx)
    assert store.maps
    for name, calls in store.maps.items():
        assert len(calls) == 2
        p = calls[0]
        b, heads, nq, length = p.shape
        assert (b, length) == (2, 5) and heads >= 1
        shape = store.spatial_shapes[name]
        assert shape is not None and nq == shape[0] * shape[1] * shape[2]
        assert torch.allclose(p.sum(-1), torch.ones(b, heads, nq), atol=1e-5)
    assert store.mean_map(token=1).ndim == 3

    # replaying the very same maps reproduces the output
    with torch.no_grad(), AttentionControl(latent_net, ReplaceAttention(store.maps, until_fraction=1.0)):
        assert (latent_net(x, t, ctx) - ref).abs().max().item() < 1e-6
    # another prompt with the source's maps injected differs from it without injection
    ctx2 = torch.randn_like(ctx)
    with torch.no_grad():
        plain2 = latent_net(x, t, ctx2)
        with AttentionControl(latent_net, ReplaceAttention(store.maps, until_fraction=1.0)):
            replaced2 = latent_net(x, t, ctx2)
        with AttentionControl(latent_net, ReweightTokens([1, 2], 1.0)):
            assert (latent_net(x, t, ctx2) - plain2).abs().max().item() < 1e-6
        with AttentionControl(latent_net, ReweightTokens([1, 2], 3.0)):
            reweighted2 = latent_net(x, t, ctx2)
    assert (replaced2 - plain2).abs().max().item() > 1e-4
    assert (reweighted2 - plain2).abs().max().item() > 1e-4


def test_replace_and_reweight_semantics():
    site = AttentionSite("blk", 0, (2, 2, 2), 2)
    src = torch.rand(2, 2, 8, 4)
    cur = torch.rand(2, 2, 8, 4)
    rep = ReplaceAttention({"blk": [src, src]}, token_map=[0, -1, 2, 1], until_fraction=0.5)
    out = rep(cur, site)
    assert torch.equal(out[..., 0], src[..., 0]) and torch.equal(out[..., 1], cur[..., 1])
    assert torch.equal(out[..., 2], src[..., 2]) and torch.equal(out[..., 3], src[..., 1])
    # after until_fraction of the recorded calls the current maps are kept
    assert torch.equal(rep(cur, AttentionSite("blk", 1, (2, 2, 2), 2)), cur)
    with pytest.raises(InputError, match="ran more often"):
        rep(cur, AttentionSite("blk", 2, (2, 2, 2), 2))
    # only the conditional half of a [null; cond] batch
    half = ReplaceAttention({"blk": [src]}, batch_rows=slice(1, None))(cur, site)
    assert torch.equal(half[0], cur[0]) and torch.equal(half[1], src[1])
    rw = ReweightTokens([3], 2.0, batch_rows=[1])(cur, site)
    assert torch.equal(rw[0], cur[0]) and torch.allclose(rw[1, ..., 3], 2 * cur[1, ..., 3])
    assert torch.equal(rw[1, ..., :3], cur[1, ..., :3])


def test_attention_control_rejects_nesting_and_plain_nets(latent_net):
    with AttentionControl(latent_net, _noop):
        with pytest.raises(ModelError, match="already"), AttentionControl(latent_net, _noop):
            pass
    with pytest.raises(ModelError, match="no MONAI CrossAttentionBlock"):
        with AttentionControl(torch.nn.Linear(2, 2), _noop):
            pass
