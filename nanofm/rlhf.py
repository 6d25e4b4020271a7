"""The mathematics of alignment, one small function each, written out so the formulas can be read:
the reward model's and DPO's losses, PPO's advantages (GAE), clipped losses and KL estimators,
and GRPO's group advantages. train_rlhf.py puts them in loops; the tests check each against a
hand computation.

    loss, stats = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
    loss = reward_loss(score_chosen, score_rejected)                   # Bradley-Terry
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    loss, stats = ppo_policy_loss(logp, old_logp, advantages, mask, clip=0.2)
    advantages = group_advantages(rewards.view(n_prompts, group_size))  # GRPO

Design decisions and conventions (REFERENCES.md's post-training facts):
- Sequence log-probabilities are summed over the completion's tokens (the reply and its <|end|>),
  never over the prompt; `sequence_logprobs` takes the loss mask the chat format made.
- Tensors are [batch, time] with a 0/1 float mask of the completion tokens; every mean is a
  masked mean over real tokens, so padding on either side changes nothing.
- KL to the reference: k1 = logp - ref_logp per token (what PPO folds into the reward; its mean
  over samples is the KL, though single tokens can be negative), k3 = exp(ref - logp) - (ref -
  logp) - 1 (GRPO's estimator: never negative, unbiased).
- GAE runs backwards over the completion with gamma and lambda; positions after the last real
  token carry nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanofm.model import token_logprobs


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                      vocab_limit: int | None = None) -> torch.Tensor:
    """Summed log p(target) over the masked (completion) positions: logits [B, T, V] -> [B]."""
    logp = token_logprobs(logits, targets.masked_fill(mask == 0, 0), vocab_limit)
    return (logp * mask).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected), averaged over pairs."""
    return -F.logsigmoid(chosen - rejected).mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))), from summed
    completion log-probabilities. At the start (policy = reference) it is ln 2. The implicit
    rewards beta (pi - ref) are returned for logging."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    stats = {"chosen_reward": chosen_reward.mean().item(), "rejected_reward": rejected_reward.mean().item(),
             "margin": margin.mean().item(), "accuracy": (margin > 0).float().mean().item()}
    return loss, stats


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [B, T] tokens: delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = delta_t + gamma lam A_{t+1}, returns = A + V; masked positions are outside the episode."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # a masked position passes the future through unchanged (right padding has none; left padding comes first)
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_advantage = torch.where(m > 0, advantage, next_advantage)
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions (the mean kept when shift_mean is False)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2, clip_high: float | None = None) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate: -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A), masked mean,
    with eps_high = clip unless `clip_high` is given (DAPO's clip-higher, Yu et al. 2025: a wider
    upper bound lets unlikely tokens with a positive advantage grow, against entropy collapse).
    Stats: the clipped fraction and the approximate KL to the rollout policy, mean((ratio - 1) - log ratio)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + (clip if clip_high is None else clip_high))
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean((clipped > unclipped).float(), mask).item(),
                 "approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item(),
                 "ratio": masked_mean(ratio, mask).item()}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> torch.Tensor:
    """0.5 max((V - R)^2, (clip(V, V_old +- eps) - R)^2), masked mean."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps) per row of [n_prompts, group_size] rewards."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=True) if rewards.size(-1) > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)
