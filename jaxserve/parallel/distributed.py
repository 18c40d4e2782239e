"""Multi-host serving: one leader process schedules, every process runs the same device steps.

JAX is multi-controller: a jitted step over a mesh that spans several hosts runs only when every
process calls it, with the same shapes and the same host inputs, in the same order. jaxserve
keeps the scheduler, block manager and server in ONE process (process 0, the leader), so the
others (followers) cannot decide anything; they mirror the leader's device calls:

    process 0                                   process k > 0
    ---------                                   -------------
    initialize_distributed(addr, n, 0)          initialize_distributed(addr, n, k)
    build the runner (params, cache, warm-up)   build the runner (same config, same order)
    server + engine loop; each step:            follower_loop(runner)
      lead_call(runner, "run_packed", ...)  -->   ... runner.run_packed(same args)
    at shutdown: stop_followers()           -->   loop returns

`lead_call` broadcasts (method name, host arguments) with `broadcast_step_inputs`, then calls the
method locally; `follower_loop` receives each message and makes the same call. The arguments are
the step's packed host arrays (ForwardBatch, sampling metadata: numpy), so followers need no
scheduler state. Warm-up must go through lead_call too (or be run by each process in the same
order), since it executes steps.

The payload is pickled: it comes from process 0 of the same job, which every process already
trusts with its code; never point a follower at an untrusted coordinator.
"""

from __future__ import annotations

import pickle

import numpy as np

_MIN_PAYLOAD = 4096  # bytes; payload buffers are padded to powers of two from here


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int, *,
                           local_device_ids=None, initialization_timeout: int = 300) -> None:
    """Join a multi-process JAX job; call before anything touches a device.

    coordinator_address: "host:port" of process 0 (it listens there). On CPU the cross-process
    collectives go through gloo (jax_cpu_collectives_implementation, the default in jax 0.10.2;
    set explicitly so older defaults do not leave collectives unimplemented). GPUs use NCCL.
    """
    import jax

    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id!r}")
    if ":" not in coordinator_address:
        raise ValueError(f"coordinator_address must be host:port, got {coordinator_address!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)


def is_leader() -> bool:
    import jax

    return jax.process_index() == 0


def broadcast_step_inputs(host_arrays=None):
    """Process 0's `host_arrays` (any picklable pytree, typically numpy arrays) on every process.

    Followers pass None (their argument is ignored). Two collectives: the payload length, then
    the payload padded to a power of two so that the broadcast compiles once per size class,
    not once per step. Single-process: returns the input unchanged, no collective.
    """
    import jax
    from jax.experimental.multihost_utils import broadcast_one_to_all

    if jax.process_count() == 1:
        return host_arrays
    leader = jax.process_index() == 0
    data = pickle.dumps(host_arrays, protocol=pickle.HIGHEST_PROTOCOL) if leader else b""
    # int32 length: a step's inputs are far below 2 GiB; i64 would need jax_enable_x64.
    n = int(np.asarray(broadcast_one_to_all(np.array([len(data)], np.int32)))[0])
    size = _MIN_PAYLOAD
    while size < n:
        size *= 2
    buf = np.zeros(size, np.uint8)
    if leader:
        buf[:n] = np.frombuffer(data, np.uint8)
    buf = np.asarray(broadcast_one_to_all(buf))
    return pickle.loads(buf[:n].tobytes())


def lead_call(target, method: str, *args, **kwargs):
    """On the leader: announce target.method(*args, **kwargs) to the followers, then run it.
    A no-op wrapper in a single-process run."""
    import jax

    if jax.process_count() > 1:
        if not is_leader():
            raise RuntimeError("lead_call runs on process 0; other processes run follower_loop")
        broadcast_step_inputs(("call", method, args, kwargs))
    return getattr(target, method)(*args, **kwargs)


def stop_followers() -> None:
    """On the leader at shutdown: end every follower_loop."""
    import jax

    if jax.process_count() > 1 and is_leader():
        broadcast_step_inputs(("stop",))


def follower_loop(runner) -> int:
    """Run on every process but 0: make each call the leader announces, in order, until
    stop_followers. Results are dropped (the leader owns the engine). Returns the call count."""
    import jax

    if jax.process_count() > 1 and is_leader():
        raise RuntimeError("follower_loop runs on processes other than 0")
    calls = 0
    while True:
        message = broadcast_step_inputs(None)
        if message[0] == "stop":
            return calls
        _, method, args, kwargs = message
        getattr(runner, method)(*args, **kwargs)
        calls += 1
