"""The sync verbs show up in a torch.profiler trace under their heloco.* names."""

import torch
from torch.profiler import ProfilerActivity, profile

from heloco import AsyncAggregator, DiLoCoWorker, HeLoCo, InProcessTransport

NAMES = {"heloco.pseudo_gradient", "heloco.submit", "heloco.correction", "heloco.outer_step", "heloco.load"}


def test_one_round_under_the_profiler_records_every_heloco_region():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    masters = [p.detach().clone() for p in model.parameters()]
    agg = AsyncAggregator(masters, HeLoCo(masters), num_workers=1, arrival_weight=0.5, dispatch="lookahead")
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with DiLoCoWorker(model, inner, InProcessTransport(agg), worker_id=0, sync_every=1) as worker:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(torch.ones(4, 3)).pow(2).mean().backward()
            inner.step()  # the round ends here: Δ, submit, outer step (HeLoCo plans its correction), load
        assert worker.last_update is not None and worker.last_update.applied
    names = {e.name for e in prof.events()}
    assert names >= NAMES, sorted(NAMES - names)
