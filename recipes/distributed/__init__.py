"""mode=distributed: each DiLoCo worker is a process (``accelerate launch``); rank 0 also serves the
aggregator. Entry point: ``recipes.distributed.run.run_distributed``.

    run           the entry point, top to bottom: setup, rank 0's services, transport, worker, end
    setup         accelerator and process group, signals, the other ranks' reports
    gate          rank 0's Gate (the aggregator behind the shared RunDriver) and its Background thread
    rank0         rank 0's services: metrics log, evaluation, checkpoints, Hub, shutdown, summary
    worker        the round loop every rank runs (InnerLoop, then DiLoCoWorker.sync())
    worker_state  each worker's own part of a checkpoint
    resume        which checkpoint a restarted job continues from
    rejoin        a single worker restarted into a running job
    checks        launch checks: world size, options, identical start
    pacing        emulated slowdown and the speed probe (DyLU)
    store         the job's store, per launcher attempt
    logs          per-rank JSONL files and the locked metrics log
"""
