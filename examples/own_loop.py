"""HeLoCo inside your own Accelerate loop: one `with` line turns the loop into a DiLoCo worker.

    python examples/own_loop.py

A tiny Llama learns a toy sequence task; the server (AsyncAggregator + HeLoCo outer optimizer) lives in
the same process here. For real asynchronous workers use recipes/train.py (simulate or distributed).
"""

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from heloco import AsyncAggregator, DiLoCoWorker, HeLoCo, InProcessTransport


def main(steps: int = 120, sync_every: int = 20) -> tuple[float, float]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    data = (torch.arange(32).repeat(64, 1) + torch.randint(0, 32, (64, 1))) % 64  # shifted ramps
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)

    # --- the server: fp32 master copy of the global model + the outer optimizer ----------------------
    global_params = [p.detach().clone() for p in model.parameters()]
    server = AsyncAggregator(global_params, HeLoCo(global_params), num_workers=1)

    # --- your loop, unchanged, inside one `with` ------------------------------------------------------
    accelerator = Accelerator()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    with DiLoCoWorker(model, optimizer, InProcessTransport(server), worker_id=0, sync_every=sync_every):
        while len(losses) < steps:
            for batch in loader:
                loss = model(input_ids=batch, labels=batch).loss
                accelerator.backward(loss)
                optimizer.step()  # every `sync_every` steps: Δ → server → corrected outer step → reload
                optimizer.zero_grad()
                losses.append(loss.item())
                if len(losses) == steps:
                    break
    print(f"loss {losses[0]:.3f} → {losses[-1]:.3f} after {server.version} outer steps")
    return losses[0], losses[-1]


if __name__ == "__main__":
    main()
