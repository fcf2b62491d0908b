"""clipn_core.training without Ray: schedule, prompt choice, optimiser groups, one real step."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import clipn_core as cc
from clipn_core.images import SplitPreprocessor
from clipn_core.lit import LockedImageCLIP, split_image_tower
from clipn_core.model import text_features, trim_tokens
from clipn_core.training import (
    ContrastiveCLIP,
    build_optimizer,
    clip_train_step,
    clipn_train_step,
    prompt_choices,
    sample_id,
    text_id,
    warmup_cosine,
)
from clipn_core.weights import create_base_clip
from jobs.demo import world


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(4, 14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(9) == pytest.approx(0.5)
    assert f(14) == pytest.approx(0.0, abs=1e-12) and f(20) == pytest.approx(0.0, abs=1e-12)


def test_prompt_choice_is_a_function_of_sample_step_and_seed_only():
    ids = np.array([text_id(f"caption {i}") for i in range(64)], dtype=np.int64)
    whole = prompt_choices(ids, step=3, seed=0, num_prompts=4)
    halves = torch.cat([prompt_choices(ids[:20], 3, 0, 4), prompt_choices(ids[20:], 3, 0, 4)])
    assert torch.equal(whole, halves)  # however the batch is split across workers
    assert whole.min() >= 0 and whole.max() <= 4 and len(set(whole.tolist())) == 5
    assert not torch.equal(whole, prompt_choices(ids, step=4, seed=0, num_prompts=4))
    assert not torch.equal(whole, prompt_choices(ids, step=3, seed=1, num_prompts=4))


def test_ids_are_stable_and_distinguish_pairs():
    assert text_id("a red circle") == text_id("a red circle") != text_id("a red square")
    assert sample_id(b"img", "a") != sample_id(b"img", "b") != sample_id(b"im", "gb")


def test_explicit_prompt_index_selects_that_prompt(tiny):
    model, _, tok = tiny
    no = model.no_tower
    with torch.no_grad():
        saved = no.prompts.clone()
        no.prompts.copy_(torch.randn_like(no.prompts))
        try:
            text = tok(["a red circle", "a blue star"])
            mean = model.encode_text_no(text)  # eval: the mean of the prompts
            k = no.num_prompts
            assert torch.allclose(model.encode_text_no(text, prompt_idx=torch.tensor([k, k])), mean, atol=1e-6)
            first = model.encode_text_no(text, prompt_idx=torch.tensor([0, 0]))
            assert not torch.allclose(first, mean, atol=1e-3)
        finally:
            no.prompts.copy_(saved)


def test_no_weight_decay_on_gains_biases_and_one_dim_params(tiny):
    model, _, _ = tiny
    opt = build_optimizer(model.no_tower.named_parameters(), lr=1e-3, weight_decay=0.2)
    decay, plain = opt.param_groups
    assert decay["weight_decay"] == 0.2 and plain["weight_decay"] == 0.0
    assert any(p is model.no_tower.prompts for p in decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in plain["params"])
    assert len(decay["params"]) + len(plain["params"]) == len(model.trainable_parameters())


def test_train_steps_lower_the_loss_and_touch_only_the_no_tower():

    model, _ = cc.build_clipn("clipn-tiny", num_prompts=4, seed=0)
    frozen = {k: v.clone() for k, v in model.clip.state_dict().items()}
    model.train()
    pre = SplitPreprocessor(model.preprocess_cfg)
    tok = cc.get_tokenizer(model)
    shapes = world.SHAPES[:4]
    captions = [f"a {c} {s}" for s in shapes for c in ("red", "blue", "green", "pink")]
    images = pre.normalize(torch.from_numpy(np.stack([
        pre.to_uint8(world.render(cap.split()[2], cap.split()[1], i, 32)) for i, cap in enumerate(captions)])))
    tokens = tok(captions)
    ids = torch.tensor([text_id(c) for c in captions])
    opt = build_optimizer(model.no_tower.named_parameters(), lr=2e-3, weight_decay=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(2, 30))
    losses = []
    for step in range(30):
        m = clipn_train_step(model, images, tokens, prompt_choices(ids.numpy(), step, 0, 4), ids,
                             model.logit_scale, opt, sched, model.trainable_parameters(), 1.0)
        losses.append(m.loss)
        assert m.grad_norm > 0 and np.isfinite(m.loss)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    for k, v in model.clip.state_dict().items():
        assert torch.equal(v, frozen[k]), k


def test_clip_stage_step_trains_both_towers_and_clamps_the_scale():
    clip, _, _ = create_base_clip("clipn-tiny", seed=0)
    clip.train()
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    pre = SplitPreprocessor(dict(open_clip.get_model_preprocess_cfg(clip)))
    captions = [f"a {c} {s}" for s in world.SHAPES[:4] for c in ("red", "blue")] * 2  # every caption twice
    images = pre.normalize(torch.from_numpy(np.stack([
        pre.to_uint8(world.render(cap.split()[2], cap.split()[1], i, 32)) for i, cap in enumerate(captions)])))
    tokens = open_clip.SimpleTokenizer(context_length=32)(captions)
    ids = torch.tensor([text_id(c) for c in captions])
    opt = build_optimizer(clip.named_parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(2, 40))
    losses = []
    for _ in range(40):
        m = clip_train_step(clip, clip, images, tokens, ids, opt, sched, list(clip.parameters()), 1.0,
                            max_logit_scale=20.0)
        losses.append(m.parts["contrastive"])
        assert m.parts["logit_scale"] <= 20.0 + 1e-4
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    moved = [k for k, v in clip.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("visual.") for k in moved) and any(k.startswith("transformer.") for k in moved)
    assert "logit_scale" in moved


@pytest.mark.parametrize("stage", ["clip", "lit", "clipn"])
def test_training_forwards_on_trimmed_captions_give_the_full_context_features_and_gradients(stage):
    """Each stage's forward runs the text towers on the tokens up to the batch's longest caption: the features
    and gradients of open_clip's full-context towers (a causal mask and end-of-text pooling)."""
    clip, _, _ = create_base_clip("clipn-tiny", seed=0)
    tokens = open_clip.SimpleTokenizer(context_length=32)(["a red circle", "star", "a photo of a small green triangle",
                                                             "a blue square"])
    assert trim_tokens(tokens, clip, clip.text_pool_type).shape[1] <= tokens.shape[1] // 2  # the trim is exercised
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=g)
    if stage == "clip":
        module = ContrastiveCLIP(clip).train()
        params = list(clip.parameters())
        full, short = (lambda: clip(images, tokens)[:3]), (lambda: module(images, tokens))
    elif stage == "lit":
        module = LockedImageCLIP(clip).train()
        params = [p for p in clip.parameters() if p.requires_grad]
        feats = module.locked(images).detach()

        def full():
            head = split_image_tower(clip)[1]
            return F.normalize(head(feats), dim=-1), clip.encode_text(tokens, normalize=True), clip.logit_scale.exp()

        short = lambda: module(feats, tokens)
    else:  # the no tower, moved off the yes tower's weights as training moves it
        model = cc.CLIPN(clip, num_prompts=4).train()
        with torch.no_grad():
            for p in model.no_tower.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        params, no, idx = model.trainable_parameters(), model.no_tower, torch.tensor([0, 1, 4, 2])

        def full():
            x = text_features(no, tokens, no.pool_type, no.eos_id, no.prompt_for_batch(4, idx))
            return model.encode_image(images), clip.encode_text(tokens, normalize=True), F.normalize(x, dim=-1)

        short = lambda: model(images, tokens, prompt_idx=idx)
    results = []
    for forward in (full, short):
        for p in params:
            p.grad = None
        out = forward()
        weights = torch.Generator().manual_seed(1)  # the same random loss for both
        sum((o * torch.randn(o.shape, generator=weights)).sum() for o in out).backward()
        results.append(([o.detach() for o in out], [torch.zeros_like(p) if p.grad is None else p.grad for p in params]))
    (out_full, grad_full), (out_short, grad_short) = results
    for a, b in zip(out_full, out_short, strict=True):
        torch.testing.assert_close(b, a, atol=2e-6, rtol=1e-5)
    for a, b in zip(grad_full, grad_short, strict=True):  # float32 sums in another order: ~1e-6 of the largest
        assert float((b - a).abs().max()) <= 1e-5 * float(a.abs().max()) + 1e-7
    assert sum(float(gr.abs().sum()) for gr in grad_short) > 0
