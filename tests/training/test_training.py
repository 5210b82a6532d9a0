"""Training techniques: self-critical training, scheduled sampling, label smoothing, attention
regularisation, warm-up schedules, gradient accumulation, mixed precision, init_from."""

import functools
import math

import pytest
import torch
import transformers
from hydra.utils import instantiate
from omegaconf import OmegaConf

from captioner.checkpoint import CheckpointError, build_model
from captioner.cli.train import run
from captioner.data.tokenizer import with_vocabulary
from captioner.models.scheduled_sampling import mix_tokens, scheduled_sampling
from captioner.training.init_from import InitFromCheckpoint
from captioner.training.module import CaptioningModule, attention_penalty
from captioner.training.schedules import build_scheduler, scheduled_sampling_prob
from captioner.training.scst import (
    CaptionReward,
    leave_one_out_baseline,
    rewards_and_baseline,
    self_critical_loss,
)


def tiny_module(cfg, **kwargs):
    """Data module and Lightning module built as cli/train.py builds them."""
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    tok = dm.tokenizer
    model_config = with_vocabulary(OmegaConf.to_container(cfg.model, resolve=True), tok)
    module = CaptioningModule(model=build_model(model_config), tokenizer=tok,
                              model_config=model_config, optimizer=instantiate(cfg.optimizer),
                              **kwargs)
    return dm, module


def fast_run(train_cfg, *overrides: str) -> dict:
    """One batch of train/val/test through cli/train.py, with short captions to keep it quick."""
    return run(train_cfg("debug=fast", "decode.max_length=5", "val_decode.max_length=5", *overrides))


def a_batch(dm):
    return next(iter(dm.train_dataloader()))


# ---- self-critical training ---------------------------------------------------------------------
def test_self_critical_loss_on_hand_made_numbers():
    logprobs = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    reward, baseline = torch.tensor([1.0, 0.2]), torch.tensor([0.5, 0.5])
    loss = self_critical_loss(logprobs, mask, reward, baseline)
    # advantages (0.5, -0.3), mean log-probs (-1, -2): -mean(0.5 * -1, -0.3 * -2) = -0.05
    assert loss.item() == pytest.approx(-0.05)
    loss.backward()
    # descent raises the log-probs of the sample above its baseline, lowers the one below it;
    # padding gets no gradient
    expected = torch.tensor([[-0.125, -0.125, 0.0], [0.15, 0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected)
    # a baseline equal to the reward leaves nothing to learn
    assert self_critical_loss(logprobs, mask, reward, reward).item() == 0.0


def test_leave_one_out_baseline_is_the_mean_of_the_other_samples():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    expected = torch.tensor([[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]])
    torch.testing.assert_close(leave_one_out_baseline(rewards), expected)
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_baseline(rewards[:, :1])


def test_rewards_and_baselines_are_aligned_with_samples():
    def reward_fn(captions, ids):  # a reward we can compute by hand: words + 10 * image id
        return torch.tensor([len(c.split()) + 10.0 * i for c, i in zip(captions, ids)]).numpy()

    samples = ["a", "a b", "a b c", "x"]  # image 0: two samples, then image 1
    reward, base = rewards_and_baseline(reward_fn, samples, [0, 1], 2, "greedy",
                                        greedy=["g g g g", "g"])
    torch.testing.assert_close(reward, torch.tensor([1.0, 2.0, 13.0, 11.0]))
    torch.testing.assert_close(base, torch.tensor([4.0, 4.0, 11.0, 11.0]))
    reward, base = rewards_and_baseline(reward_fn, samples, [0, 1], 2, "mean")
    torch.testing.assert_close(base, torch.tensor([2.0, 1.0, 11.0, 13.0]))
    with pytest.raises(ValueError, match="baseline"):
        rewards_and_baseline(reward_fn, samples, [0, 1], 2, "critic")


def test_cider_reward_prefers_the_caption_matching_the_references():
    refs = {0: ["A red circle left of a blue square.", "a red circle beside a blue square"],
            1: ["A green triangle above a yellow star.", "a green triangle over a star"]}
    reward = CaptionReward(refs)
    scores = reward(["a red circle left of a blue square", "a green triangle above a star"], [0, 0])
    assert scores[0] > 1.0 > scores[1] >= 0.0


def test_a_bleu_term_pays_for_length_and_matches_pycocoevalcap():
    """bleu_weight adds the caption's own BLEU-4 (pycocoevalcap's per-image value): a caption
    cut short of its references gains less from it than the full one."""
    from pycocoevalcap.bleu.bleu import Bleu

    from captioner.metrics.text import tokenize

    refs = {0: ["a red circle left of a blue square", "a red circle beside a blue square"]}
    hyps = ["a red circle left of a blue square", "a red circle left of a"]
    plain, weighted = CaptionReward(refs), CaptionReward(refs, bleu_weight=2.0)
    bonus = weighted(hyps, [0, 0]) - plain(hyps, [0, 0])
    tok_refs = [tokenize(c) for c in refs[0]]
    for hyp, b in zip(hyps, bonus):
        _, per = Bleu(4).compute_score({0: tok_refs}, {0: [tokenize(hyp)]}, verbose=0)
        assert b == pytest.approx(2.0 * per[3][0], abs=1e-9)
    assert bonus[0] > bonus[1] > 0
    with pytest.raises(ValueError, match="bleu_weight"):
        CaptionReward(refs, bleu_weight=-1)


def test_scst_fast_dev_run_both_baselines(train_cfg):
    for baseline in ("greedy", "mean"):
        metrics = fast_run(train_cfg, "experiment=scst", "init_from=null",
                           f"loss.scst.baseline={baseline}", "loss.scst.num_samples=2",
                           "loss.scst.max_length=8", "loss.scst.bleu_weight=0.5")
        assert math.isfinite(metrics["train/loss"]) and "train/reward" in metrics


@pytest.fixture
def ce_checkpoint(train_cfg):
    cfg = train_cfg("trainer.limit_train_batches=1", "val_decode.max_length=4", "test=false")
    run(cfg)
    return f"{cfg.paths.output_dir}/checkpoints/last.ckpt"


def test_init_from_loads_weights_only(train_cfg, ce_checkpoint):
    cfg = train_cfg()
    _, module = tiny_module(cfg)
    trained = torch.load(ce_checkpoint, weights_only=True)["state_dict"]
    InitFromCheckpoint(ce_checkpoint).setup(None, module, "fit")
    for name, value in module.model.state_dict().items():
        torch.testing.assert_close(value, trained[f"model.{name}"])
    # a model of another shape is refused with the file's name
    _, wider = tiny_module(train_cfg("model.decoder.hidden_size=48"))
    with pytest.raises(CheckpointError, match="last.ckpt"):
        InitFromCheckpoint(ce_checkpoint).setup(None, wider, "fit")
    # and the self-critical stage runs from it
    metrics = fast_run(train_cfg, "experiment=scst", f"init_from={ce_checkpoint}",
                       "loss.scst.num_samples=2", "loss.scst.max_length=8")
    assert math.isfinite(metrics["train/loss"])


# ---- cross-entropy techniques -------------------------------------------------------------------
def test_attention_penalty_on_hand_made_attention():
    # 1 caption, 3 steps (the last one padding), 2 regions
    attn = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]])
    real = torch.tensor([[True, True, False]])
    # coverage (1.5, 0.5): ((1 - 1.5)^2 + (1 - 0.5)^2) / 2 = 0.25
    assert attention_penalty(attn, real).item() == pytest.approx(0.25)
    assert attention_penalty(torch.full((1, 2, 2), 0.5), torch.ones(1, 2, dtype=torch.bool)).item() == 0.0


def test_label_smoothing_enters_the_caption_loss(train_cfg):
    cfg = train_cfg()
    dm, module = tiny_module(cfg, alpha_c=0.0, label_smoothing=0.1)
    module.eval()
    batch = a_batch(dm)
    tokens = batch["captions"].flatten(0, 1)  # (B*k, T)
    logits, _ = module.model(batch["images"], tokens[:, :-1])
    logp = logits.log_softmax(-1)  # (B*k, T-1, V)
    real = tokens[:, 1:] != module.model.pad_id
    nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)[real].mean()
    uniform = -logp.mean(-1)[real].mean()  # cross-entropy with the uniform distribution
    with torch.no_grad():
        loss = module.caption_loss(batch)
    torch.testing.assert_close(loss, 0.9 * nll + 0.1 * uniform)


def test_scheduled_sampling_schedule_and_mixing():
    probs = [scheduled_sampling_prob(e, start=0.0, increase=0.05, every=5, max_prob=0.25)
             for e in (0, 4, 5, 12, 100)]
    assert probs == pytest.approx([0.0, 0.0, 0.05, 0.1, 0.25])
    gold, predicted = torch.zeros(1000, dtype=torch.long), torch.ones(1000, dtype=torch.long)
    assert mix_tokens(gold, predicted, 0.0).sum() == 0
    assert mix_tokens(gold, predicted, 1.0).sum() == 1000
    torch.manual_seed(0)
    assert 200 < mix_tokens(gold, predicted, 0.25).sum() < 300


def test_scheduled_sampling_forward(train_cfg):
    cfg = train_cfg()
    dm, module = tiny_module(cfg)
    module.eval()  # no dropout: the step-wise loop must equal teacher forcing at probability 0
    batch = a_batch(dm)
    features = module.model.encode(batch["images"])
    tokens = batch["captions"].flatten(0, 1)[:, :-1]  # (B*k, T-1)
    with torch.no_grad():
        expected, expected_attn = module.model.decoder(features, tokens)
        logits, attn = scheduled_sampling(module.model.decoder, features, tokens, 0.0)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(attn, expected_attn, atol=1e-5, rtol=1e-4)
        # at probability 1 the model reads its own tokens: the logits change after the first step
        mixed, _ = module.model(None, tokens, features=features, ss_prob=1.0)
        torch.testing.assert_close(mixed[:, 0], expected[:, 0], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(mixed[:, 1:], expected[:, 1:], atol=1e-3)


def test_scheduled_sampling_fast_dev_run(train_cfg):
    metrics = fast_run(train_cfg, "loss.scheduled_sampling.start=0.5",
                       "loss.scheduled_sampling.max_prob=0.5")
    assert metrics["train/ss_prob"] == 0.5 and math.isfinite(metrics["train/loss"])


def test_label_smoothing_fast_dev_run(train_cfg):
    assert math.isfinite(fast_run(train_cfg, "loss.label_smoothing=0.1")["train/loss"])


# ---- optimisation -------------------------------------------------------------------------------
def test_build_scheduler_fills_in_the_number_of_training_steps():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = functools.partial(transformers.get_cosine_schedule_with_warmup, num_warmup_steps=2)
    sched = build_scheduler(cosine, opt, num_training_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0]) and lrs[-1] < 0.05
    # a factory that does not take it, or was given it, is called as it is
    plateau = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="max")
    assert isinstance(build_scheduler(plateau, opt, 10), torch.optim.lr_scheduler.ReduceLROnPlateau)
    fixed = functools.partial(cosine, num_training_steps=4)
    assert build_scheduler(fixed, opt, 10).lr_lambdas[0](3) == pytest.approx(0.5)


@pytest.mark.parametrize("overrides", [
    ["scheduler=cosine", "scheduler.num_warmup_steps=2"],
    ["scheduler=inverse_sqrt", "scheduler.num_warmup_steps=2"],
    ["trainer.accumulate_grad_batches=2"],
    ["trainer.precision=bf16-mixed"],
], ids=["cosine", "inverse_sqrt", "accumulate", "bf16"])
def test_optimisation_settings_fast_dev_run(train_cfg, overrides):
    assert math.isfinite(fast_run(train_cfg, *overrides)["train/loss"])

