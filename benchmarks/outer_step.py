"""Cost of one HeLoCo outer step relative to one inner training step, on small Llama models.

For each model size, in the same run and interleaved (the order rotates every repetition):

(a) inner: one forward + backward + AdamW step + zero_grad on a batch of 8 × 128 random tokens;
(b) outer, foreach: pseudo-gradient Δ = global − local written into the preallocated ``.grad`` of the
    fp32 global tensors, ``HeLoCo(foreach=True).step(staleness=1)`` with the correction active
    (non-zero momentum, a Δ whose blocks are aligned with, opposed to, or orthogonal to it), and the
    new global parameters copied back into the model;
(c) outer, flat: the same math done the way a flat-buffer implementation would, concatenating all
    tensors into one vector each step (``torch.cat``), correcting per block on views of it, applying
    EMA-Nesterov to the flat vectors and copying the result back into the tensors.

The state (global parameters, local parameters, momentum) is reset before each outer measurement,
untimed, so every repetition does the same work. Prints the median times and their ratios, and the
ratios of the fastest repetitions (less sensitive to other processes sharing the cores).

    python benchmarks/outer_step.py [--sizes tiny small] [--reps 7] [--warmup 1] [--threads N]
"""

from __future__ import annotations

import argparse
import os

import torch
from common import build_llama, median, num_params, random_batch, set_threads, time_ms

from heloco.correction import correct_pseudo_gradient
from heloco.optim import HeLoCo

CORRECTION_KEYS = (
    "keep_threshold",
    "shrink_strength",
    "shrink_max",
    "reorient_strength",
    "kappa",
    "eps",
    "variant",
)


class Bench:
    """One model, its inner optimizer, a HeLoCo outer optimizer and a flat-buffer baseline."""

    def __init__(self, size: str, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.model = build_llama(size, seed=seed)
        self.local = list(self.model.parameters())
        self.inner_opt = torch.optim.AdamW(self.local, lr=1e-4)
        self.batch = random_batch(8, 128, generator=gen)

        self.global0 = [p.detach().clone() for p in self.local]
        self.global_params = [p.clone() for p in self.global0]
        for g in self.global_params:
            g.grad = torch.zeros_like(g)  # the pseudo-gradient buffer, reused every step
        self.outer = HeLoCo(self.global_params, foreach=True)
        # Momentum and Δ that exercise every branch: Δ aligned with m (kept), opposed (shrunk),
        # independent noise (cos ≈ 0: reoriented, or shrunk when slightly negative).
        self.m0 = [1e-3 * torch.randn(p.shape, generator=gen) for p in self.local]
        noise = [1e-3 * torch.randn(p.shape, generator=gen) for p in self.local]
        self.delta0 = [
            (2 * m + 0.5 * z, -m + 0.5 * z, z)[i % 3]
            for i, (m, z) in enumerate(zip(self.m0, noise, strict=True))
        ]
        self.local0 = torch._foreach_sub(self.global0, self.delta0)
        for g, m in zip(self.global_params, self.m0, strict=True):
            self.outer.state[g]["momentum_buffer"] = m.clone()

        self.shapes = [p.shape for p in self.local]
        self.sizes = [p.numel() for p in self.local]
        self.flat_m = torch.cat([m.reshape(-1) for m in self.m0])
        self.flat_m0 = self.flat_m.clone()
        group = self.outer.param_groups[0]
        self.hp = {k: group[k] for k in CORRECTION_KEYS}
        self.lr, self.mu = group["lr"], group["momentum"]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [v.view(s) for v, s in zip(flat.split(self.sizes), self.shapes, strict=True)]

    @torch.no_grad()
    def reset(self) -> None:
        torch._foreach_copy_(self.global_params, self.global0)
        torch._foreach_copy_(self.local, self.local0)
        torch._foreach_copy_([self.outer.state[g]["momentum_buffer"] for g in self.global_params], self.m0)
        self.flat_m.copy_(self.flat_m0)

    def inner_step(self) -> None:
        loss = self.model(**self.batch).loss
        loss.backward()
        self.inner_opt.step()
        self.inner_opt.zero_grad()

    @torch.no_grad()
    def outer_foreach(self) -> None:
        grads = [g.grad for g in self.global_params]
        torch._foreach_copy_(grads, self.global_params)
        torch._foreach_sub_(grads, self.local)
        self.outer.step(staleness=1)
        torch._foreach_copy_(self.local, self.global_params)

    @torch.no_grad()
    def outer_flat(self) -> None:
        flat_g = torch.cat([g.reshape(-1) for g in self.global_params])
        flat_d = flat_g - torch.cat([p.reshape(-1) for p in self.local])
        self.flat_stats = correct_pseudo_gradient(self.views(flat_d), self.views(self.flat_m), **self.hp)
        self.flat_m.lerp_(flat_d, 1.0 - self.mu)
        flat_g.add_(flat_d, alpha=-self.lr)
        flat_g.add_(self.flat_m, alpha=-self.lr * self.mu)
        new = self.views(flat_g)
        torch._foreach_copy_(self.global_params, new)
        torch._foreach_copy_(self.local, new)

    def check_same_result(self) -> float:
        """Both outer implementations, from the same state, give the same new parameters."""
        self.reset()
        self.outer_foreach()
        a = [g.clone() for g in self.global_params]
        self.reset()
        self.outer_flat()
        if self.outer.last_stats != self.flat_stats:
            raise RuntimeError("foreach and flat outer steps made different correction decisions")
        return max(float((x - y).abs().max()) for x, y in zip(a, self.global_params, strict=True))


def run(size: str, reps: int, warmup: int) -> None:
    bench = Bench(size)
    max_diff = bench.check_same_result()
    kinds = ("inner", "foreach", "flat")
    fns = {"inner": bench.inner_step, "foreach": bench.outer_foreach, "flat": bench.outer_flat}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for rep in range(warmup + reps):
        order = kinds[rep % 3 :] + kinds[: rep % 3]
        for kind in order:
            if kind != "inner":
                bench.reset()
            ms = time_ms(fns[kind])
            if rep >= warmup:
                times[kind].append(ms)
    inner, fe, flat = (median(times[k]) for k in kinds)
    best_inner, best_fe, best_flat = (min(times[k]) for k in kinds)
    stats = bench.outer.last_stats.as_dict()
    print(
        f"outer_step {size} ({num_params(bench.model) / 1e6:.1f}M params): "
        f"foreach/inner = {fe / inner:.3f}  flat/inner = {flat / inner:.3f}  "
        f"(inner {inner:.1f} ms, outer foreach {fe:.1f} ms, outer flat {flat:.1f} ms)"
    )
    print(
        f"  fastest of each: foreach/inner = {best_fe / best_inner:.3f}  flat/inner = {best_flat / best_inner:.3f}  "
        f"(inner {best_inner:.1f} ms, outer foreach {best_fe:.1f} ms, outer flat {best_flat:.1f} ms)"
    )
    print(
        f"  blocks kept/shrunk/reoriented = {stats['frac_blocks_kept']:.2f}/{stats['frac_blocks_shrunk']:.2f}/"
        f"{stats['frac_blocks_reoriented']:.2f}; max |foreach − flat| after one step = {max_diff:.1e}; "
        f"medians of {reps} reps after {warmup} warm-up; load average {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="default: every core this process may use")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    print(f"torch {torch.__version__}, {threads} threads")
    for size in args.sizes:
        run(size, args.reps, args.warmup)


if __name__ == "__main__":
    main()
