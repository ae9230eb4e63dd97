"""ESP's mask embeddings: k vectors synthesized from the model's own input-embedding table, fed as extra
input rows so that their logits propose the tokens 1..k positions ahead (ESP, "Efficient Training-Free
Multi-Token Prediction via Embedding-Space Probing", arXiv 2603.17942).

One component, used by ESP (`mtp.esp`), ESP+ (`mtp.esp_plus`) and Figure 2's analysis
(`experiments.alignment`):
- **init**, once per generation from the prompt: `mean` of the prompt's token embeddings (the paper's
  default); `last_k`, the embeddings of the prompt's last k tokens (mask i = e_{t-k+i}); `sample`, a draw
  from N(μ, σ²) of the table; `ood`, μ + `ood_sigmas`·σ (the paper's out-of-distribution ablation);
  `recent` (beyond the paper), a mean weighted by exp(−age / `init_window`) over the prompt.
- **update**, towards the embeddings of committed tokens only (rejected drafts never enter): the paper's
  EMA m ← m + λ(e − m), once per committed token in order (`ema=token`) or once per step with the last
  token (`ema=step`). Beyond the paper: `momentum` adds a velocity, v ← momentum·v + λ(e − m), m ← m + v;
  `depth_lam` moves mask j at λ / j.
"""

from __future__ import annotations

import torch

from mtp.errors import ConfigError

INITS = ("mean", "last_k", "sample", "ood", "recent")
EMAS = ("token", "step")


class MaskEmbeddings:
    """k mask embeddings (`vectors`, (k, H) fp32), their init per generation and update per commit."""

    def __init__(
        self,
        k: int,
        init: str = "mean",
        lam: float = 0.1,
        ema: str = "token",
        momentum: float = 0.0,
        depth_lam: bool = False,
        init_window: float = 16,
        ood_sigmas: float = 5.0,
        seed: int = 0,
    ):
        for key, val, allowed in (("init", init, INITS), ("ema", ema, EMAS)):
            if val not in allowed:
                raise ConfigError(f"method.{key}={val!r}: expected one of {list(allowed)}")
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"method.k={k!r}: at least one mask is needed")
        if not 0 <= lam <= 1:
            raise ConfigError(f"method.lam={lam}: the EMA rate must be in [0, 1]")
        if not 0 <= momentum < 1:
            raise ConfigError(f"method.momentum={momentum}: expected 0 <= momentum < 1 (0 = the paper's EMA)")
        if init_window <= 0:
            raise ConfigError(f"method.init_window={init_window} must be > 0")
        self.k, self.init, self.lam, self.ema = k, init, lam, ema
        self.momentum, self.depth_lam, self.init_window = momentum, depth_lam, init_window
        self.ood_sigmas, self.seed = ood_sigmas, seed

    def setup(self, model) -> None:
        """The model's input-embedding table, the scale its embedding layer multiplies rows by (Gemma's
        sqrt(hidden) `embed_scale`; 1 for most models), and the scaled table's per-dimension mean and std.
        The masks live where the model's input rows live: in the scaled space."""
        embed = model.get_input_embeddings()
        self.table = embed.weight.detach()
        self.scale = float(getattr(embed, "embed_scale", 1.0))
        self.mu = self.table.float().mean(0) * self.scale
        self.sigma = self.table.float().std(0) * self.scale

    def embed(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), H) fp32: the input rows the model's embedding layer gives these tokens."""
        return self.table[torch.tensor(ids, device=self.table.device)].float() * self.scale

    def start(self, prompt_ids: list[int]) -> torch.Tensor:
        """Initialise the masks from the prompt; returns them as (k, H) rows in the model's dtype."""
        k, table = self.k, self.table
        if self.init == "mean":
            m = self.embed(prompt_ids).mean(0).expand(k, -1)
        elif self.init == "last_k":  # m_i = e_{t-k+i}
            last = prompt_ids[-k:] if len(prompt_ids) >= k else [prompt_ids[0]] * (k - len(prompt_ids)) + prompt_ids
            m = self.embed(last)
        elif self.init == "recent":  # context-weighted: the latest prompt tokens weigh most
            age = torch.arange(len(prompt_ids) - 1, -1, -1, device=table.device, dtype=torch.float)
            w = torch.exp(-age / self.init_window)
            m = ((w[:, None] * self.embed(prompt_ids)).sum(0) / w.sum()).expand(k, -1)
        elif self.init == "sample":
            g = torch.Generator(device=table.device).manual_seed(self.seed)
            m = (self.mu + self.sigma * torch.randn(self.mu.shape, generator=g, device=table.device)).expand(k, -1)
        else:  # ood
            m = (self.mu + self.ood_sigmas * self.sigma).expand(k, -1)
        self.vectors = m.clone()
        self.velocity = torch.zeros_like(self.vectors)
        return self.rows(1)

    def update(self, committed: list[int]) -> None:
        """Move the masks towards the committed tokens' embeddings (all of them, in order, or the last)."""
        tokens = committed if self.ema == "token" else committed[-1:]
        e = self.embed(tokens)
        lam = self.lam
        if self.depth_lam:
            lam = self.lam / torch.arange(1, self.k + 1, device=e.device, dtype=torch.float)[:, None]
        for row in e:
            if self.momentum:
                self.velocity.mul_(self.momentum).add_(lam * (row - self.vectors))
                self.vectors += self.velocity
            else:
                self.vectors += lam * (row - self.vectors)

    def rows(self, owners: int) -> torch.Tensor:
        """(owners * k, H) input rows in the model's dtype: the k masks once per owner node."""
        return self.vectors.to(self.table.dtype).repeat(owners, 1)
