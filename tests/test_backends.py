"""`use_backend` is context-local: a block in one thread never changes another thread's choice,
and interleaved blocks in different threads never undo each other."""
import threading

from tokenreduce import backends

OP = "attention_with_scores"


def test_use_backend_is_local_to_the_thread():
    inside, release, seen = threading.Event(), threading.Event(), {}

    def pinned():
        with backends.use_backend(OP, "triton"):
            seen["pinned inside"] = backends.get_backend(OP)
            inside.set()
            release.wait(10)
        seen["pinned after"] = backends.get_backend(OP)

    t = threading.Thread(target=pinned)
    t.start()
    assert inside.wait(10)
    seen["other thread"] = backends.get_backend(OP)   # the main thread, while the block is open
    release.set()
    t.join(10)
    assert seen == {"pinned inside": "triton", "other thread": None, "pinned after": None}


def test_interleaved_blocks_in_two_threads_do_not_pop_each_other():
    order, seen = [threading.Event() for _ in range(4)], {}

    def a():
        with backends.use_backend(OP, "triton"):
            order[0].set()
            order[1].wait(10)                         # b has entered its block
            seen["a inside"] = backends.get_backend(OP)
        order[2].set()                                # a leaves first
        order[3].wait(10)

    def b():
        order[0].wait(10)
        with backends.use_backend(OP, "native"):
            order[1].set()
            order[2].wait(10)                         # a has left its block
            seen["b inside"] = backends.get_backend(OP)
        seen["b after"] = backends.get_backend(OP)
        order[3].set()

    ts = [threading.Thread(target=f) for f in (a, b)]
    [t.start() for t in ts]
    [t.join(10) for t in ts]
    assert seen == {"a inside": "triton", "b inside": "native", "b after": None}


def test_nested_blocks_and_set_backend():
    assert backends.get_backend(OP) is None
    backends.set_backend(OP, "native")
    try:
        with backends.use_backend(OP, "triton"):
            with backends.use_backend(OP, "native"):
                assert backends.get_backend(OP) == "native"
            assert backends.get_backend(OP) == "triton"
        assert backends.get_backend(OP) == "native"              # the process-wide pin
    finally:
        backends.set_backend(OP, None)
    assert backends.get_backend(OP) is None
