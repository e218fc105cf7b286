import pytest

from heloco.simulation import VirtualClock, dylu_steps


def run_async(clock: VirtualClock, steps: list[int], arrivals: int) -> list[tuple[float, int]]:
    for w, h in enumerate(steps):
        clock.start(w, h)
    return run_async_continue(clock, steps, arrivals)


def test_arrival_order_by_hand():
    # speeds 1, 0.5 steps/s, H = 2: worker 0 arrives every 2 s, worker 1 every 4 s.
    # t=2 w0, t=4 w0 (tie with w1 at 4: lower id first), t=4 w1, t=6 w0, t=8 w0, t=8 w1
    seen = run_async(VirtualClock([1.0, 0.5]), [2, 2], 6)
    assert seen == [(2.0, 0), (4.0, 0), (4.0, 1), (6.0, 0), (8.0, 0), (8.0, 1)]


def test_async_consumes_tokens_2_75x_faster_than_sync():
    speeds, h = [1.0, 1.0, 0.5, 0.25], 10
    # async: every worker is always busy -> sum of speeds = 2.75 inner steps per virtual second
    clock = VirtualClock(speeds)
    seen = run_async(clock, [h] * 4, 400)
    async_rate = 400 * h / seen[-1][0]
    # sync: a round of K*H steps takes as long as the slowest worker, H / 0.25
    clock = VirtualClock(speeds)
    for _ in range(10):
        for w in range(4):
            clock.start(w, h)
        for _ in range(4):
            clock.pop()
    sync_rate = 10 * 4 * h / clock.now
    assert sync_rate == pytest.approx(1.0)
    assert async_rate / sync_rate == pytest.approx(2.75, rel=0.01)


def test_sync_idle_time_is_waiting_for_the_slowest():
    clock = VirtualClock([1.0, 0.5])
    for _ in range(3):
        for w in range(2):
            clock.start(w, 2)
        clock.pop()
        clock.pop()
    for w in range(2):
        clock.start(w, 2)
    # each round lasts 4 s; worker 0 waited 2 s in each of the 3 completed rounds
    assert clock.idle == [6.0, 0.0]
    assert clock.busy == [8.0, 16.0]


def test_jitter_is_seeded_and_per_worker():
    a = run_async(VirtualClock([1.0, 0.7, 0.3], jitter=0.3, seed=5), [5, 5, 5], 50)
    b = run_async(VirtualClock([1.0, 0.7, 0.3], jitter=0.3, seed=5), [5, 5, 5], 50)
    c = run_async(VirtualClock([1.0, 0.7, 0.3], jitter=0.3, seed=6), [5, 5, 5], 50)
    assert a == b
    assert a != c
    # a worker's durations do not depend on the others' arrival order
    d1 = [VirtualClock([1.0, 2.0], jitter=0.5, seed=1).duration(0, 10) for _ in range(2)]
    assert d1[0] == d1[1]


def test_state_dict_resumes_identically():
    clock = VirtualClock([1.0, 0.6, 0.2], jitter=0.2, seed=3)
    run_async(clock, [4, 4, 4], 7)
    saved = clock.state_dict()
    rest = run_async_continue(clock, [4, 4, 4], 9)
    other = VirtualClock([1.0, 0.6, 0.2], jitter=0.2, seed=3)
    other.load_state_dict(saved)
    assert run_async_continue(other, [4, 4, 4], 9) == rest
    assert other.idle == clock.idle and other.busy == clock.busy


def run_async_continue(clock, steps, arrivals):
    seen = []
    for _ in range(arrivals):
        t, w = clock.pop()
        seen.append((t, w))
        clock.start(w, steps[w])
    return seen


def test_dylu_by_hand():
    # H_w = max(1, floor(v_w / max v * H))
    assert dylu_steps([1.0, 1.0, 0.5, 0.25], 20) == [20, 20, 10, 5]
    assert dylu_steps([4.0, 0.1], 10) == [10, 1]


def test_tempered_dylu_by_hand():
    # (1/4)^0.5 · 20 = 10, (1/6)^0.5 · 20 = 8.16 → 8, (1/15)^0.5 · 20 = 5.16 → 5; power 0: equal rounds
    assert dylu_steps([1.0, 0.25], 20, power=0.5) == [20, 10]
    assert dylu_steps([1.0, 1 / 6, 1 / 15], 20, power=0.5) == [20, 8, 5]
    assert dylu_steps([1.0, 1 / 6], 20, power=0.0) == [20, 20]
    assert dylu_steps([1.0, 1 / 6], 20, power=1.0) == dylu_steps([1.0, 1 / 6], 20)
    with pytest.raises(ValueError, match="dylu_power"):
        dylu_steps([1.0], 20, power=1.5)


@pytest.mark.parametrize(
    ("speeds", "jitter", "match"),
    [
        ([], 0.0, "at least one"),
        ([1.0, 0.0], 0.0, r"worker_speeds\[1\]"),
        ([1.0, -2], 0.0, "positive"),
        ([1.0], 1.5, "jitter"),
    ],
)
def test_bad_input(speeds, jitter, match):
    with pytest.raises(ValueError, match=match):
        VirtualClock(speeds, jitter=jitter)


def test_double_start_is_an_error():
    clock = VirtualClock([1.0])
    clock.start(0, 1)
    with pytest.raises(RuntimeError, match="already"):
        clock.start(0, 1)
