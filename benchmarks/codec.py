"""Bytes on the wire and cost of each pseudo-gradient codec, relative to one inner training step, on the
paper's 15M model (GPT-2 shape: 8 layers, width 128, 4 heads, untied head, GPT-2's 50257 vocabulary).

For each codec (fp32, bf16, blockwise int8, top-1% in 2 bits per chunk of 4096 or over the whole
Δ), wrapped in ``ErrorFeedback`` as a worker would use it, in the same run and interleaved (the order
rotates every repetition):

(a) inner: one forward + backward + AdamW step + zero_grad on a batch of 2 × 128 random tokens;
(b) encode+decode: the worker's ``ErrorFeedback.encode(Δ)`` (Δ + β·e, encoded into a preallocated
    wire buffer of ``max_nbytes`` as a transport would, and the residual update, which the encoder
    does from the values it computed rather than by decoding its own message; none for fp32, which
    is lossless) plus the server's ``decode`` of the message into fp32 tensors (its own codec
    instance).

(c) floor: what any error-fed codec must do however fast its own work, on buffers of Δ's size: the
    worker's one pass a = Δ + e (read Δ and e, write a, which becomes the next e but for the entries
    sent) and the server's one write of the fp32 Δ it hands to the outer step. Memory traffic
    only, so it tells how far a codec's time is from what this machine's memory allows.

Δ is a real pseudo-gradient: θ before minus θ after the warm-up inner steps. Prints, per codec, the
bytes of fp32 over the codec's bytes and the median encode+decode time as a share of the median inner
step (goal ≤ 0.05) and as a multiple of the floor, then the worker/server split and the relative
error ‖decode(m) − Δ‖ / ‖Δ‖ of the first message (what error feedback carries to the next round).

``--baseline REF`` also times ``heloco.codecs`` as it is at git revision REF (e.g. ``main``; the single
file ``heloco/codecs.py`` of old or the package ``heloco/codecs/``), imported from a copy of REF's
``heloco`` (``git archive``), each codec timed right after the current one in the same run, so a
change is measured under the same load: the machine's load moves both alike.

    python benchmarks/codec.py [--reps 5] [--warmup 1] [--threads N] [--baseline REF]
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import types

import torch
from common import median, num_params, random_batch, set_threads, time_ms

from heloco.codecs import ErrorFeedback, make_codec
from recipes.model import build_model

VOCAB = 50257  # GPT-2's, which the authors' runs used
SEQ_LEN = 128
BATCH = 2
GOAL = 0.05
CODECS = {
    "fp32+ef": dict(name="fp32"),
    "bf16+ef": dict(name="bf16"),
    "int8+ef": dict(name="int8", block=256),
    "topk1%/2bit+ef": dict(name="topk", fraction=0.01, bits=2, chunk=4096),
    "topk1%/2bit global+ef": dict(name="topk", fraction=0.01, bits=2, chunk=4096, scope="global"),
}


def codecs_at(revision: str) -> types.ModuleType:
    """``heloco.codecs`` as it is at git ``revision``, whichever its layout (one file or a package):
    REF's ``heloco`` is extracted into a temporary folder and imported while the current ``heloco``
    modules are set aside, then they are put back. The revision's modules keep their own globals,
    so its codecs keep calling its own code."""

    def ours(name: str) -> bool:
        return name == "heloco" or name.startswith("heloco.")

    archive = subprocess.run(["git", "archive", revision, "heloco"], capture_output=True, check=True).stdout
    with tempfile.TemporaryDirectory(prefix="codecs_at_") as folder:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        current = {name: sys.modules.pop(name) for name in list(sys.modules) if ours(name)}
        sys.path.insert(0, folder)
        try:
            return importlib.import_module("heloco.codecs")
        finally:
            sys.path.remove(folder)
            for name in [name for name in sys.modules if ours(name)]:
                del sys.modules[name]
            sys.modules.update(current)


class Bench:
    """The paper's model, its AdamW, a real Δ, and one ErrorFeedback per codec (and per codec of a
    baseline revision, labelled ``"<codec> @<revision>"``)."""

    def __init__(self, warmup: int, seed: int = 0, baseline: str | None = None) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.model = build_model(
            "paper", vocab_size=VOCAB, max_positions=SEQ_LEN, eos_token_id=None, seed=seed
        )
        self.params = list(self.model.parameters())
        self.inner_opt = torch.optim.AdamW(self.params, lr=1e-3)
        self.batch = random_batch(BATCH, SEQ_LEN, vocab_size=VOCAB, generator=gen)
        start = [p.detach().clone() for p in self.params]
        for _ in range(max(1, warmup)):
            self.inner_step()
        self.delta = [s - p.detach() for s, p in zip(start, self.params, strict=True)]
        self.received = [torch.empty_like(d) for d in self.delta]
        numel = sum(d.numel() for d in self.delta)
        self.flat_delta = torch.cat([d.reshape(-1) for d in self.delta])
        self.flat_residual = torch.randn(numel, generator=gen)
        self.flat_accumulated = torch.empty(numel)
        self.flat_received = torch.empty(numel)
        self.feedback = {label: ErrorFeedback(make_codec(**cfg)) for label, cfg in CODECS.items()}
        self.server_codec = {label: make_codec(**cfg) for label, cfg in CODECS.items()}
        if baseline is not None:
            old = codecs_at(baseline)
            for label, cfg in CODECS.items():
                try:
                    self.server_codec[f"{label} @{baseline}"] = old.make_codec(**cfg)
                except ValueError:  # a codec or option the baseline does not have
                    continue
                self.feedback[f"{label} @{baseline}"] = old.ErrorFeedback(old.make_codec(**cfg))
        shapes = [d.shape for d in self.delta]
        self.wire = {
            label: torch.empty(codec.max_nbytes(shapes), dtype=torch.uint8)
            for label, codec in self.server_codec.items()
        }

    def inner_step(self) -> None:
        loss = self.model(**self.batch).loss
        loss.backward()
        self.inner_opt.step()
        self.inner_opt.zero_grad()

    def floor(self) -> None:
        torch.add(self.flat_delta, self.flat_residual, out=self.flat_accumulated)
        self.flat_received.zero_()

    def worker(self, label: str) -> None:
        self.message = self.feedback[label].encode(self.delta, out=self.wire[label])

    def server(self, label: str) -> None:
        self.server_codec[label].decode(self.message, self.received)

    def first_message(self, label: str) -> tuple[int, float]:
        """Bytes of one message and its relative error on a fresh residual (reset afterwards)."""
        ef = self.feedback[label]
        ef.reset()
        self.worker(label)
        self.server(label)
        ef.reset()
        err = torch.stack(torch._foreach_norm(torch._foreach_sub(self.received, self.delta))).norm()
        ref = torch.stack(torch._foreach_norm(self.delta)).norm()
        return self.message.nbytes, float(err / ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="default: every core this process may use")
    parser.add_argument("--baseline", default=None, help="a git revision whose codecs to time alongside")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    print(f"torch {torch.__version__}, {threads} threads")
    bench = Bench(args.warmup, baseline=args.baseline)
    sizes = {label: bench.first_message(label) for label in CODECS}
    fp32_bytes = sizes["fp32+ef"][0]

    # each codec's baseline right after it: the pair meets the same load, however it moves
    timed = tuple(k for label in CODECS for k in (label, f"{label} @{args.baseline}") if k in bench.feedback)
    kinds = ("inner", "floor", *timed)
    worker: dict[str, list[float]] = {k: [] for k in kinds}
    server: dict[str, list[float]] = {k: [] for k in timed}
    for rep in range(args.warmup + args.reps):
        order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]
        for kind in order:
            if kind in ("inner", "floor"):
                ms = time_ms(bench.inner_step if kind == "inner" else bench.floor)
            else:
                ms = time_ms(lambda kind=kind: bench.worker(kind))
                if rep >= args.warmup:
                    server[kind].append(time_ms(lambda kind=kind: bench.server(kind)))
            if rep >= args.warmup:
                worker[kind].append(ms)
    inner, floor = median(worker["inner"]), median(worker["floor"])
    print(
        f"codec on the paper's model ({num_params(bench.model) / 1e6:.1f}M params, vocab {VOCAB}, "
        f"batch {BATCH} × {SEQ_LEN}): one inner step {inner:.1f} ms"
    )
    print(
        f"floor of an error-fed codec (a = Δ + e, and the server's write of fp32 Δ): {floor:.1f} ms = "
        f"{floor / inner:.3f} of one inner step"
    )
    for label in CODECS:
        nbytes, rel_err = sizes[label]
        enc, dec = median(worker[label]), median(server[label])
        total = median([w + s for w, s in zip(worker[label], server[label], strict=True)])
        print(
            f"{label}: {fp32_bytes / nbytes:.2f}x fewer bytes, encode+decode {total:.1f} ms = "
            f"{total / inner:.3f} of one inner step (goal <= {GOAL}) = {total / floor:.1f}x the floor"
        )
        print(
            f"  {nbytes} bytes; worker ErrorFeedback.encode {enc:.1f} ms + server decode {dec:.1f} ms; "
            f"first message ‖decode − Δ‖/‖Δ‖ = {rel_err:.3f}"
        )
        key = f"{label} @{args.baseline}"
        if key in worker:
            before = median([w + s for w, s in zip(worker[key], server[key], strict=True)])
            print(
                f"  before (@{args.baseline}): {before:.1f} ms = {before / inner:.3f} of one inner step; "
                f"now {before / total:.1f}x faster"
            )
    print(f"  medians of {args.reps} reps after {args.warmup} warm-up; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
