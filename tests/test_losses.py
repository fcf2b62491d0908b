"""ITBO + TSO: hand values, gradient flow, and 1-process == 2-process (gloo) on the same global batch."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipn_core.losses import clip_contrastive_loss, clipn_loss, itbo_loss, tso_loss


def test_itbo_and_tso_by_hand():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g_no = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # logits_yes = I, logits_no = swap; d = no - yes: diag -1, off-diag +1 (scale 1)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected_itbo = -math.log(1 - sig(-1.0)) + -math.log(sig(1.0))
    assert itbo_loss(f, g, g_no, 1.0).item() == pytest.approx(expected_itbo, abs=1e-6)
    # g . g_no = 0 for both rows -> 2 - sqrt(2 + 1e-4)
    assert tso_loss(g, g_no).item() == pytest.approx(2 - math.sqrt(2 + 1e-4), abs=1e-6)
    parts = clipn_loss(f, g, g_no, 1.0)
    assert parts.total.item() == pytest.approx(parts.itbo.item() + parts.tso.item())


def test_identical_captions_count_as_matched():
    torch.manual_seed(0)
    f, g, g_no = (F.normalize(torch.randn(4, 8), dim=-1) for _ in range(3))
    ids = torch.tensor([7, 7, 3, 5])  # pairs (0,1) and (1,0) share a caption
    matched = ids[:, None] == ids[None, :]
    d = 10.0 * (f @ g_no.T - f @ g.T)
    expected = -F.logsigmoid(-d[matched]).mean() - F.logsigmoid(d[~matched]).mean()
    got = clipn_loss(f, g, g_no, 10.0, caption_ids=ids).itbo
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    assert got.item() != pytest.approx(clipn_loss(f, g, g_no, 10.0).itbo.item(), abs=1e-4)


def test_gradients_reach_only_the_no_tower_and_prompts(tiny):
    import copy

    from clipn_core.model import CLIPN

    base, _, tok = tiny
    model = CLIPN(copy.deepcopy(base.clip), num_prompts=4).train()
    images = torch.randn(4, 3, 32, 32)
    text = tok(["a red circle", "a blue square", "a green star", "a pink ring"])
    f, g, g_no = model(images, text)
    clipn_loss(f, g, g_no, model.logit_scale).total.backward()
    assert all(p.grad is None for p in model.clip.parameters())
    assert not any(p.requires_grad for p in model.clip.parameters())
    no_grads = {n: p.grad for n, p in model.no_tower.named_parameters()}
    assert no_grads["prompts"] is not None and no_grads["prompts"].abs().sum() > 0
    assert no_grads["transformer.resblocks.0.attn.in_proj_weight"].abs().sum() > 0
    # training mode never leaks into the frozen towers
    assert not model.clip.training and model.no_tower.training


def _setup_features(seed=0, n=8, d=16):
    g = torch.Generator().manual_seed(seed)
    x_img, x_txt = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    ids = torch.tensor([0, 1, 2, 2, 3, 4, 5, 5])
    return x_img, x_txt, ids


def _heads(seed=1, d=16):
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({k: torch.nn.Linear(d, d) for k in ("img", "txt", "no")})


def _loss(heads, x_img, x_txt, ids):
    f = F.normalize(heads["img"](x_img), dim=-1)
    g = F.normalize(heads["txt"](x_txt), dim=-1)
    g_no = F.normalize(heads["no"](x_txt), dim=-1)
    return clipn_loss(f, g, g_no, 20.0, caption_ids=ids)


def _worker(rank, world, port, first, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x_img, x_txt, ids = _setup_features()
        sl = slice(0, first) if rank == 0 else slice(first, x_img.shape[0])
        heads = _heads()
        loss = _loss(heads, x_img[sl], x_txt[sl], ids[sl])
        loss.total.backward()
        grads = {}
        for name, p in heads.named_parameters():
            dist.all_reduce(p.grad)  # what DDP does: average over ranks
            grads[name] = p.grad / world
        out[rank] = {"total": loss.total.item(), "itbo": loss.itbo.item(), "grads": grads}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("first", [4, 5], ids=["equal-split", "unequal-split"])
def test_two_process_gloo_equals_one_process(first):
    """Rank 0 holds ``first`` of the 8 pairs; unequal splits happen when undecodable pairs are dropped."""
    x_img, x_txt, ids = _setup_features()
    heads = _heads()
    single = _loss(heads, x_img, x_txt, ids)
    single.total.backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(2, port, first, out), nprocs=2, join=True, start_method="spawn")
        results = dict(out)
    for rank in (0, 1):
        assert results[rank]["total"] == pytest.approx(single.total.item(), abs=1e-5)
        assert results[rank]["itbo"] == pytest.approx(single.itbo.item(), abs=1e-5)
        for name, p in heads.named_parameters():
            torch.testing.assert_close(results[rank]["grads"][name], p.grad, atol=1e-5, rtol=1e-4)


def test_clip_contrastive_loss_by_hand_and_multi_positive():
    torch.manual_seed(0)
    f, g = (F.normalize(torch.randn(3, 8), dim=-1) for _ in range(2))
    scale = torch.tensor(5.0)
    logits = 5.0 * f @ g.T
    # unique captions: open_clip's ClipLoss (cross-entropy against the diagonal, both directions)
    expected = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    assert clip_contrastive_loss(f, g, scale).item() == pytest.approx(expected.item(), abs=1e-6)
    assert clip_contrastive_loss(f, g, scale, torch.tensor([1, 2, 3])).item() == pytest.approx(expected.item(), abs=1e-6)
    # rows 0 and 1 share a caption: each row's target is uniform over its two positives
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    by_hand = (-(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.T.log_softmax(1)).sum(1).mean()) / 2
    got = clip_contrastive_loss(f, g, scale, torch.tensor([7, 7, 3]))
    assert got.item() == pytest.approx(by_hand.item(), abs=1e-6)
    assert got.item() != pytest.approx(expected.item(), abs=1e-3)
