"""The PyTorch peer: anomalib's FastFlow block built from FrEIA, timed the way the study ran it.

  python -m benchmarks.peer_torch                  # train step + per-patch norms at 4 and 8 steps
  python -m benchmarks.peer_torch --steps=8 --threads=2

Install (CPU build of torch; FrEIA needs only numpy and scipy besides torch):
  .venv/bin/pip install torch==2.14.1 FrEIA

The flow is anomalib's ``create_fast_flow_block`` shape: a FrEIA ``SequenceINN``
of ``AllInOneBlock(subnet_constructor=subnet_conv(kernel, hidden_ratio=1.0),
affine_clamping=2.0, permute_soft=False)``, kernels 3×3 on even blocks and 1×1
on odd ones, each subnet ZeroPad → Conv(k) → ReLU → ZeroPad → Conv(k)
(``hidden = int(in · hidden_ratio)``), on the benchmarks' 14×14×112 feature
maps behind a parameter-free LayerNorm over (C, H, W) (ours: ``layer_norm="image"``).
AllInOneBlock always applies its learned global affine (softplus scale) and
permutes channels with a 1×1 convolution by a permutation matrix; our flow
permutes by indexing and has no global affine in these benchmarks, so per
location the peer does ≈ 27 % more multiply-adds than ours (C² per block for
the permutation against the subnets' 9·¾C² or ¾C², 3×3 / 1×1).

Per-patch NLL. FrEIA returns one log-determinant per image (summed over C, H,
W); the tail-aware loss needs it per location. ``_PatchLogdetBlock`` is
AllInOneBlock with its ``_affine`` restated to also keep
``Σ_c clamp·tanh(0.1·a_c)`` per location (same operations, nothing extra in
the graph); adding ``Σ_c log scale_c`` of the global affine gives logdet_i, and
``patch_logdet_error`` checks Σ_i logdet_i against FrEIA's own per-image value.
``NLL_i = ½‖z_i‖² − logdet_i + (C/2)·log 2π``.

Measured here:
  (a) ``peer_train_step_ms``: one Adam step of ``(1−λ)·mean NLL + λ·mean top-k
      NLL`` per image (λ = 0.7, k = 4) on a batch of 16: forward, backward,
      update; warm-up, then the median of several;
  (b) ``peer_per_patch_norms``: the study's per-patch parameter-gradient norms —
      one forward of one image, then a Python loop of
      ``torch.autograd.grad(NLL_i, params, retain_graph=True)`` over its 196
      patches, ‖·‖ of each.

torch is imported only inside these functions, so importing this module costs
nothing and works without torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time
from typing import Sequence

C, H, W = 112, 14, 14
TAIL_WEIGHT, TOP_K = 0.7, 4


def peer_available() -> bool:
  """True when torch and FrEIA can be imported."""
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "FrEIA"))


_BLOCK = None


def _block_class():
  """AllInOneBlock that also keeps its per-location coupling log-determinant (built on first use)."""
  global _BLOCK
  if _BLOCK is None:
    import torch
    from FrEIA.modules import AllInOneBlock

    class _PatchLogdetBlock(AllInOneBlock):
      patch_logdet = None  # [B, H, W]: Σ_c of the coupling's log-scale, from the last forward

      def _affine(self, x, a, rev=False):
        if rev or self.GIN:
          raise NotImplementedError("the peer runs AllInOneBlock forward, without GIN")
        a = 0.1 * a
        ch = x.shape[1]
        log_scale = self.clamp * torch.tanh(a[:, :ch])
        self.patch_logdet = log_scale.sum(1)
        return x * torch.exp(log_scale) + a[:, ch:], self.patch_logdet.sum(dim=(1, 2))

    _BLOCK = _PatchLogdetBlock
  return _BLOCK


def subnet_conv(kernel_size: int, hidden_ratio: float):
  """anomalib's subnet: ZeroPad → Conv(k) → ReLU → ZeroPad → Conv(k), "same" size for odd k."""
  from torch import nn

  def make(in_channels: int, out_channels: int):
    hidden = int(in_channels * hidden_ratio)
    lo, hi = kernel_size // 2 - ((1 + kernel_size) % 2), kernel_size // 2
    return nn.Sequential(nn.ZeroPad2d((lo, hi, lo, hi)), nn.Conv2d(in_channels, hidden, kernel_size), nn.ReLU(),
                         nn.ZeroPad2d((lo, hi, lo, hi)), nn.Conv2d(hidden, out_channels, kernel_size))
  return make


def build_flow(num_steps: int, channels: int = C, height: int = H, width: int = W, *, hidden_ratio: float = 1.0,
               conv3x3_only: bool = False, clamp: float = 2.0, seed: int = 0):
  """anomalib's ``create_fast_flow_block``: a FrEIA SequenceINN of AllInOneBlocks, 3×3 / 1×1 alternating."""
  import numpy as np
  import torch
  from FrEIA.framework import SequenceINN

  torch.manual_seed(seed)
  np.random.seed(seed)  # AllInOneBlock draws its hard permutation from NumPy's global generator
  flow = SequenceINN(channels, height, width)
  for i in range(num_steps):
    k = 1 if i % 2 == 1 and not conv3x3_only else 3
    flow.append(_block_class(), subnet_constructor=subnet_conv(k, hidden_ratio), affine_clamping=clamp,
                permute_soft=False)
  return flow


def _forward(flow, x_BxCxHxW):
  """(z, logdet_BxHxW, FrEIA's per-image logdet) of parameter-free-LayerNorm'd features."""
  import torch
  import torch.nn.functional as F

  z, logdet_image = flow(F.layer_norm(x_BxCxHxW, x_BxCxHxW.shape[1:]))
  logdet = 0
  for block in flow:
    logdet = logdet + block.patch_logdet + torch.log(block.global_scale_activation(block.global_scale)).sum()
  return z, logdet, logdet_image


def patch_nll(flow, x_BxCxHxW):
  """Per-patch NLL [B, H·W]: ½‖z_i‖² − logdet_i + (C/2)·log 2π."""
  z, logdet, _ = _forward(flow, x_BxCxHxW)
  nll = 0.5 * z.square().sum(1) - logdet + 0.5 * z.shape[1] * math.log(2 * math.pi)
  return nll.reshape(nll.shape[0], -1)


def patch_logdet_error(num_steps: int = 4, batch: int = 2, seed: int = 0) -> float:
  """max |Σ_i logdet_i − FrEIA's per-image logdet| / (1 + |FrEIA's|): the per-patch split is exact."""
  import torch

  flow = build_flow(num_steps, seed=seed)
  with torch.no_grad():  # trained-like: the zero-free default init already gives non-trivial log-scales
    x = torch.randn(batch, C, H, W, generator=torch.Generator().manual_seed(seed))
    _, logdet, logdet_image = _forward(flow, x)
    err = (logdet.sum((1, 2)) - logdet_image).abs() / (1 + logdet_image.abs())
  return float(err.max())


def tail_aware_loss(nll_BxN, tail_weight: float = TAIL_WEIGHT, top_k: int = TOP_K):
  """(1−λ)·mean NLL + λ·mean of the k largest NLLs, per image, averaged over the batch."""
  top = nll_BxN.topk(top_k, dim=1).values.mean(1)
  return ((1 - tail_weight) * nll_BxN.mean(1) + tail_weight * top).mean()


def _threads(threads: int | None) -> int:
  return int(threads or os.cpu_count() or 1)


def peer_train_step_ms(num_steps: int, batch: int = 16, *, channels: int = C, height: int = H, width: int = W,
                       tail_weight: float = TAIL_WEIGHT, top_k: int = TOP_K, learning_rate: float = 1e-3,
                       warmup: int = 3, repeats: int = 10, threads: int | None = None, seed: int = 0,
                       device: str = "cpu") -> dict:
  """Milliseconds per Adam step of the tail-aware loss (forward + backward + update), median of ``repeats``.

  ``device``: "cpu" (torch threads = ``threads``, default all cores) or a torch
  device such as "cuda". Each step ends with the loss read back to the host, so
  GPU time is included. Returns a dict: ``ms`` (median), ``ms_all``, ``flops``
  (one step's, by torch's ``FlopCounterMode``: matmuls and convolutions, which is
  nearly all of it; XLA's count of ours includes the elementwise ops too),
  ``num_steps``, ``batch``, ``threads``, ``torch``, ``device``.
  """
  import torch

  prev = torch.get_num_threads()
  torch.set_num_threads(_threads(threads))
  try:
    flow = build_flow(num_steps, channels, height, width, seed=seed).to(device)
    opt = torch.optim.Adam(flow.parameters(), lr=learning_rate)
    x = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed)).to(device)

    def step():
      opt.zero_grad(set_to_none=True)
      loss = tail_aware_loss(patch_nll(flow, x), tail_weight, top_k)
      loss.backward()
      opt.step()
      return float(loss.detach())

    for _ in range(warmup):
      step()
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      step()
      times.append(1000 * (time.perf_counter() - t))
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:   # one more step, counted (not timed)
      step()
    return {"ms": statistics.median(times), "ms_all": times, "num_steps": num_steps, "batch": batch,
            "flops": float(counter.get_total_flops()),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(x.device)}
  finally:
    torch.set_num_threads(prev)


def peer_per_patch_norms(num_steps: int, *, channels: int = C, height: int = H, width: int = W,
                         warmup: int = 1, repeats: int = 3, threads: int | None = None, seed: int = 0,
                         x_CxHxW=None, device: str = "cpu") -> dict:
  """The study's per-patch norms ‖∂NLL_i/∂θ‖ of one image: one forward, then an autograd loop
  over its H·W patches with ``retain_graph=True``. Median seconds of ``repeats`` runs; the
  norms are read back to the host once at the end, so with ``device="cuda"`` GPU time is
  included but no per-patch synchronisation.

  Returns a dict: ``seconds`` (median), ``seconds_all``, ``norms`` (list, H·W), ``num_steps``,
  ``n_params``, ``threads``, ``torch``, ``device``.
  """
  import torch

  prev = torch.get_num_threads()
  torch.set_num_threads(_threads(threads))
  try:
    flow = build_flow(num_steps, channels, height, width, seed=seed).to(device)
    params = [p for p in flow.parameters() if p.requires_grad]
    if x_CxHxW is None:
      x = torch.randn(1, channels, height, width, generator=torch.Generator().manual_seed(seed))
    else:
      x = torch.as_tensor(x_CxHxW, dtype=torch.float32)[None]
    x = x.to(device)

    def run():
      nll = patch_nll(flow, x)[0]
      norms = []
      for i in range(nll.shape[0]):
        grads = torch.autograd.grad(nll[i], params, retain_graph=True)
        norms.append(torch.sqrt(sum(g.square().sum() for g in grads)))
      return torch.stack(norms).tolist()   # one read-back at the end: no per-patch GPU sync

    for _ in range(warmup):
      norms = run()
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      norms = run()
      times.append(time.perf_counter() - t)
    return {"seconds": statistics.median(times), "seconds_all": times, "norms": norms, "num_steps": num_steps,
            "n_params": int(sum(p.numel() for p in params)), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": str(x.device)}
  finally:
    torch.set_num_threads(prev)


def peer_per_patch_flops(num_steps: int, *, channels: int = C, height: int = H, width: int = W,
                         seed: int = 0) -> float:
  """FLOPs of ``peer_per_patch_norms``'s loop (torch's ``FlopCounterMode``): the forward
  plus H·W backward passes. Every ``autograd.grad(NLL_i, θ)`` runs the whole graph's
  backward whichever patch i it starts from, so one backward is counted and multiplied
  (the counter cannot run inside ``autograd.grad``)."""
  import torch
  from torch.utils.flop_counter import FlopCounterMode

  flow = build_flow(num_steps, channels, height, width, seed=seed)
  x = torch.randn(1, channels, height, width, generator=torch.Generator().manual_seed(seed))
  with FlopCounterMode(display=False) as counter:
    nll = patch_nll(flow, x)[0]
    forward = counter.get_total_flops()
    nll[0].backward(retain_graph=True)
    backward = counter.get_total_flops() - forward
  return float(forward + nll.shape[0] * backward)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", default="4,8", help="comma list of coupling-step counts")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
  parser.add_argument("--repeats", type=int, default=10, help="timed train steps")
  parser.add_argument("--norm-repeats", type=int, default=3, help="timed per-patch-norm runs")
  parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
  args = parser.parse_args(argv)
  if not peer_available():
    print("peer not installed (pip install torch==2.14.1 FrEIA)")
    return {}
  out = {"logdet_split_error": patch_logdet_error()}
  print(f"per-patch logdet split: max relative error vs FrEIA's per-image logdet {out['logdet_split_error']:.1e}")
  for k in [int(s) for s in args.steps.split(",")]:
    tr = peer_train_step_ms(k, args.batch, repeats=args.repeats, threads=args.threads, device=args.device)
    pn = peer_per_patch_norms(k, repeats=args.norm_repeats, threads=args.threads, device=args.device)
    out[k] = {"train_step": tr, "per_patch_norms": {kk: v for kk, v in pn.items() if kk != "norms"}}
    where = "CPU" if tr["device"] == "cpu" else tr["device"]
    print(f"{k} coupling steps (torch {tr['torch']}, {tr['threads']} threads, {where}): "
          f"train step batch {args.batch}: {tr['ms']:.1f} ms (median of {len(tr['ms_all'])}); "
          f"per-patch norms, autograd loop over {H * W} patches: {1000 * pn['seconds']:.0f} ms "
          f"({pn['n_params']} parameters)")
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
