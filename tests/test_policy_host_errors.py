"""Host-function failures: reported per evaluation (never through wasmtime-py's process-global
exception slot), and the evaluation deadline covering time spent in Python host builtins."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import wasmtime._func as wasmtime_func

from agent.config.policy import PolicySettings
from agent.policy.builtins import default_builtins
from agent.policy.engine import Policy, PolicyEvalError, load_policy
from agent.policy.errors import BuiltinError
from agent.policy.registry_builtins import UNDEFINED, BuiltinContext
from agent.wasm.engine import WasmEngine
from agent_devkit.opa.build import build


def _customs(**overrides: Any) -> Any:
    """The test policy's custom builtins (tests/policies/builtins.c), some replaced per test."""
    reg = default_builtins().copy()

    def fail(ctx: BuiltinContext, x: Any) -> Any:
        raise BuiltinError(f"refusing {x}")

    table: dict[str, Any] = {"custom.zero": lambda ctx: {"zero": True},
                             "custom.undef": lambda ctx, x: UNDEFINED if x == "undefined" else {"echo": x},
                             "custom.cat4": lambda ctx, *xs: "|".join(str(x) for x in xs),
                             "custom.fail": fail}
    table.update(overrides)
    for name, fn in table.items():
        reg.register(name, fn)
    return reg


def _load(fast: bool, deadline_ms: int = 5000, **overrides: Any) -> Policy:
    return load_policy(build("builtins"), builtins=_customs(**overrides),
                       settings=PolicySettings(eval_deadline_ms=deadline_ms, fast_calls=fast))


@pytest.mark.parametrize("fast", [True, False])
def test_concurrent_builtin_failures_each_get_their_own_message(fast: bool) -> None:
    """Two threads failing in builtins at once: wasmtime-py keeps a host exception in one global,
    so without per-instance reporting they swap (or lose) each other's messages."""
    policy = _load(fast)
    iterations = 600
    problems: list[str] = []
    done = threading.Barrier(2)

    def worker(tag: str) -> None:
        try:
            done.wait(timeout=10)
            for i in range(iterations):
                token = f"{tag}-{i}"
                try:
                    policy.evaluate(token, "t/fail")
                except PolicyEvalError as exc:
                    if exc.code != "builtin_error" or f"refusing {token}" not in str(exc):
                        problems.append(f"{token}: got code={exc.code} {exc}")
                else:
                    problems.append(f"{token}: no error")
                if len(problems) > 5 or time.monotonic() > give_up:
                    return
        except BaseException as exc:  # anything unexpected is a failure of the test, not a hang
            problems.append(f"{tag}: {type(exc).__name__}: {exc}")

    give_up = time.monotonic() + 60
    _run_together([threading.Thread(target=worker, args=(tag,)) for tag in ("left", "right")], problems)
    assert policy.evaluate(None, "t/zero").value == {"zero": True}


def _run_together(threads: list[threading.Thread], problems: list[str]) -> None:
    """Run the workers at once (bounded) and check that none saw another's error."""
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads)
    assert not problems, problems[:5]
    assert wasmtime_func.LAST_EXCEPTION is None  # nothing of ours left for another wasmtime user


@pytest.mark.parametrize("fast", [True, False])
def test_aborts_and_builtin_failures_on_two_threads_keep_their_codes(fast: bool) -> None:
    """opa_abort is a host function too: its message must not be swapped with a builtin's."""
    aborting = load_policy(build("sandbox"), settings=PolicySettings(eval_deadline_ms=5000, fast_calls=fast))
    failing = _load(fast)
    problems: list[str] = []
    give_up = time.monotonic() + 60
    start = threading.Barrier(2)

    def abort_worker() -> None:
        start.wait(timeout=10)
        for i in range(500):
            try:
                aborting.evaluate({}, "bad/abort")
                problems.append(f"abort-{i}: no error")
            except PolicyEvalError as exc:
                if exc.code != "abort" or "eval_conflict_error" not in str(exc):
                    problems.append(f"abort-{i}: got code={exc.code} {exc}")
            if len(problems) > 5 or time.monotonic() > give_up:
                return

    def builtin_worker() -> None:
        start.wait(timeout=10)
        for i in range(500):
            try:
                failing.evaluate(f"b-{i}", "t/fail")
                problems.append(f"b-{i}: no error")
            except PolicyEvalError as exc:
                if exc.code != "builtin_error" or f"refusing b-{i}" not in str(exc):
                    problems.append(f"b-{i}: got code={exc.code} {exc}")
            if len(problems) > 5 or time.monotonic() > give_up:
                return

    _run_together([threading.Thread(target=abort_worker), threading.Thread(target=builtin_worker)], problems)


# an engine whose epoch never advances (its ticker is never started): guest code is never interrupted,
# so whatever ends these evaluations is the host-side deadline check alone
FROZEN_EPOCH = WasmEngine(tick_s=3600.0)


@pytest.mark.parametrize(("fast", "minor"), [(True, 3), (False, 3), (True, 1)])
@pytest.mark.parametrize("epoch", ["frozen", "ticking"])
def test_a_slow_host_builtin_fails_the_evaluation_with_the_deadline_code(fast: bool, minor: int,
                                                                         epoch: str) -> None:
    """The epoch deadline cannot interrupt Python: a builtin that overruns must still end the
    evaluation with code "deadline" (the result is not returned) and the instance is discarded."""
    def slow_echo(ctx: BuiltinContext, x: Any) -> Any:
        if x == "slow":
            time.sleep(0.4)  # 5x the deadline: no timing is asserted, the overrun is certain
        return {"echo": x}

    policy = load_policy(build("builtins", minor=minor), builtins=_customs(**{"custom.undef": slow_echo}),
                         settings=PolicySettings(eval_deadline_ms=80, fast_calls=fast),
                         engine=FROZEN_EPOCH if epoch == "frozen" else None)
    assert policy.evaluate("quick", "t/undef").value == {"echo": "quick"}
    discarded = policy.stats.instances_discarded
    with pytest.raises(PolicyEvalError) as err:
        policy.evaluate("slow", "t/undef")
    assert err.value.code == "deadline" and "exceeded its deadline of 80 ms" in str(err.value)
    if epoch == "frozen":  # only the host-side check can have caught it (with a ticking epoch, the
        # guest code that runs after the builtin returns is usually interrupted first)
        assert "finished after it" in str(err.value)
    assert policy.stats.deadline_hits == 1 and policy.stats.errors_by_code == {"deadline": 1}
    assert policy.stats.instances_discarded == discarded + 1
    assert policy.evaluate("quick", "t/undef").value == {"echo": "quick"}  # a fresh instance serves on


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("epoch", ["frozen", "ticking"])
def test_no_builtin_is_started_once_the_deadline_has_passed(fast: bool, epoch: str) -> None:
    """t/now calls time.now_ns twice: the first call overruns the deadline, the second never runs."""
    calls: list[int] = []

    def slow_now(ctx: BuiltinContext) -> Any:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.4)
        return ctx.now_ns

    policy = load_policy(build("builtins"), builtins=_customs(**{"time.now_ns": slow_now}),
                         settings=PolicySettings(eval_deadline_ms=80, fast_calls=fast),
                         engine=FROZEN_EPOCH if epoch == "frozen" else None)
    with pytest.raises(PolicyEvalError) as err:
        policy.evaluate(None, "t/now")
    assert err.value.code == "deadline" and "exceeded its deadline of 80 ms" in str(err.value)
    if epoch == "frozen":  # refused by the builtin dispatcher (with a ticking epoch, maybe by the epoch)
        assert "host builtin time.now_ns was not started" in str(err.value)
    assert calls == [1]


def test_builtin_deadline_starts_when_the_instance_is_ready() -> None:
    """Building a fresh instance (after a failure, or a data change) is not charged to the builtins."""
    policy = _load(True, deadline_ms=1000)
    inst = policy._acquire()
    inst.ready_ns = time.perf_counter_ns() + 10**12  # "ready" far in the future: deadline counts from there
    policy._release(inst)
    assert policy.evaluate(None, "t/zero").value == {"zero": True}
    assert inst.deadline_ns > inst.ready_ns


def test_a_foreign_marker_means_a_lost_trap_not_someone_elses_error() -> None:
    """Public-API path: wasmtime-py may hand an instance another thread's marker in place of its trap."""
    from agent.policy import engine
    policy = _load(False)
    inst = policy._acquire()
    lost = inst.resolve_failure(engine._HostFailed("another thread's"))
    assert isinstance(lost, engine._LostTrap)
    mine = BuiltinError("mine")
    with pytest.raises(engine._HostFailed) as raised:
        inst._host_failed(mine)
    wasmtime_func.LAST_EXCEPTION = raised.value  # as wasmtime-py's trampoline would park it
    assert inst.resolve_failure(wasmtime_func.LAST_EXCEPTION) is mine
    assert wasmtime_func.LAST_EXCEPTION is None  # our own marker is cleared from the global slot
    other = engine._HostFailed("someone else's")
    wasmtime_func.LAST_EXCEPTION = other
    try:
        with pytest.raises(engine._HostFailed):
            inst._host_failed(BuiltinError("again"))
        wasmtime_func.LAST_EXCEPTION = other  # overwritten by another thread before we resolved
        assert str(inst.resolve_failure(other)) == "again"
        assert wasmtime_func.LAST_EXCEPTION is other  # not ours: left alone
    finally:
        wasmtime_func.LAST_EXCEPTION = None


@pytest.mark.parametrize("fast", [True, False])
def test_the_fast_path_never_touches_wasmtimes_global_exception_slot(fast: bool) -> None:
    """Fast path: raw host callbacks, so a foreign exception parked in the slot (say by the module
    runner's host function on another thread) is neither taken nor overwritten. Public path: the
    slot is used, but the evaluation still reports its own error."""
    policy = _load(fast)
    foreign = RuntimeError("someone else's host exception")
    wasmtime_func.LAST_EXCEPTION = foreign
    try:
        with pytest.raises(PolicyEvalError) as err:
            policy.evaluate("x", "t/fail")
        assert err.value.code == "builtin_error" and "refusing x" in str(err.value)
        with pytest.raises(PolicyEvalError) as aborted:
            load_policy(build("sandbox"), settings=PolicySettings(fast_calls=fast)).evaluate({}, "bad/abort")
        assert aborted.value.code == "abort"
        if fast:
            assert wasmtime_func.LAST_EXCEPTION is foreign
    finally:
        wasmtime_func.LAST_EXCEPTION = None
