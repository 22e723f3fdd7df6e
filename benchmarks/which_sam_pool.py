"""Runs the tuning chains of `which_sam.py`, one run at a time or several
in parallel processes.

A chain is a generator: it yields a list of runs it needs (argument tuples
of `which_sam.train`), receives their results in the same order, and
returns when it is done. The tuning of one method on one task and noise
rate is one chain (rho grid, then the knob grid at the picked rho, then
the seeds): its stages depend on each other, different chains do not.

Every run is a function of its arguments alone (seeded data split, noise,
initialization and schedules), so the results do not depend on the order
or the process the runs happen in: `workers=1` and `workers=N` give the
same JSON, up to the order of its entries.
"""

import collections
import concurrent.futures
import multiprocessing
import time


def run_args(task, method, rho, knob, noise, seed, epochs, lr=None):
    """The arguments of one `which_sam.train` run (chains yield lists of
    them)."""
    return (task, method, rho, knob, noise, seed, epochs, lr)


def drive(chains, store, workers=1, executor=None, train=None):
    """Runs `chains` to their end; every result goes through `store`.

    `store` has `key(args)`, `get(args)` (`None` when missing) and
    `put(args, result, seconds)`. With `workers=1` (and no `executor`) the
    runs happen here, in chain order; else in an executor of `workers`
    spawned processes, at most `workers` runs at a time, the runs of
    chains that are further along first (the critical path). `train`
    replaces the worker's run function (tests).
    """
    if workers <= 1 and executor is None:
        for chain in chains:
            _drive_one(chain, store)
        return
    if executor is None:
        executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn")
        )
    with executor:
        _drive_parallel(chains, store, workers, executor, train or _train)


def _drive_one(chain, store):
    try:
        request = next(chain)
        while True:
            results = [store.get(a) or store.run(a) for a in request]
            request = chain.send(results)
    except StopIteration:
        pass


def _drive_parallel(chains, store, workers, executor, train):
    waiting = {}  # chain index -> its request
    pending = collections.deque()  # runs not submitted yet
    in_flight = {}  # future -> (run key, args, start time)
    submitted = set()

    def advance(i, results=None):
        """Feeds `results` to chain `i` until it needs a run not stored."""
        chain = chains[i]
        try:
            request = next(chain) if results is None else chain.send(results)
            while all(store.get(a) is not None for a in request):
                request = chain.send([store.get(a) for a in request])
        except StopIteration:
            waiting.pop(i, None)
            return
        waiting[i] = request
        new = []
        for a in request:
            if store.get(a) is None and store.key(a) not in submitted:
                submitted.add(store.key(a))
                new.append(a)
        if results is None:
            pending.extend(new)
        else:  # a later stage: on the critical path, so first
            pending.extendleft(reversed(new))

    for i in range(len(chains)):
        advance(i)
    while pending or in_flight:
        while pending and len(in_flight) < workers:
            args = pending.popleft()
            future = executor.submit(train, *args)
            in_flight[future] = (args, time.time())
        done, _ = concurrent.futures.wait(
            in_flight, return_when=concurrent.futures.FIRST_COMPLETED
        )
        for future in done:
            args, start = in_flight.pop(future)
            store.put(args, future.result(), time.time() - start)
        for i, request in list(waiting.items()):
            if all(store.get(a) is not None for a in request):
                advance(i, [store.get(a) for a in request])
    if waiting:
        raise RuntimeError(f"chains left waiting: {sorted(waiting)}")


def _train(*args):
    """One run in a worker process (imports the script by its name)."""
    import which_sam

    return which_sam.train(*args)
