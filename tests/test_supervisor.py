"""`baton up --autoscale`'s supervisor (baton.up.Supervisor) as plain state: the engines it
starts, drains and starts again for the split the gateway's /health asks for, on child
processes the test stands in for and a clock it moves."""

from types import SimpleNamespace

from baton.up import Supervisor


class Proc:
    """A child process, as the supervisor sees it: the last signal it was sent."""

    def __init__(self):
        self.signal: str | None = None

    def terminate(self) -> None:
        self.signal = "TERM"

    def kill(self) -> None:
        self.signal = "KILL"


class Launch:
    """Starts `role-N` on `cpus` (baton.up.Launcher's part the supervisor uses)."""

    def __init__(self):
        self.stack = SimpleNamespace(procs={})
        self.started: list[tuple[str, list[int]]] = []

    def __call__(self, role: str, cpus: set[int]) -> str:
        name = f"{role}-{len(self.started)}"
        self.stack.procs[name] = Proc()
        self.started.append((name, sorted(cpus)))
        return name


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


SPLIT = {"prefill": 1, "decode": 1}


def health(desired: dict[str, int], *services: str) -> dict:
    return {"desired": desired, "services": list(services)}


def test_a_move_starts_the_new_engines_and_drains_the_old_once_the_gateway_lists_them():
    launch, clock = Launch(), Clock()
    supervisor = Supervisor([{0}, {1}], prefill=0, clock=clock)
    assert supervisor.start(launch) == {"prefill": 0, "decode": 1}
    assert launch.started == [("decode-0", [0, 1])]  # aggregated: one engine on both cores
    procs = launch.stack.procs
    supervisor.act(health(SPLIT, "decode-0"), launch)
    assert launch.started[1:] == [("prefill-1", [0]), ("decode-2", [1])]
    supervisor.act(health(SPLIT, "decode-0", "prefill-1"), launch)
    assert len(launch.started) == 3 and procs["decode-0"].signal is None  # decode-2 not in yet
    supervisor.act(health(SPLIT, "decode-0", "prefill-1", "decode-2"), launch)
    assert procs["decode-0"].signal == "TERM"  # drains: finishes what it holds
    clock.now += 60  # still there after the drain's time: killed
    supervisor.act(health(SPLIT, "prefill-1", "decode-2"), launch)
    assert procs["decode-0"].signal == "KILL"
    del procs["decode-0"]  # it exited (baton up forgets it)
    supervisor.act(health(SPLIT, "prefill-1", "decode-2"), launch)
    assert supervisor.draining == {} and len(launch.started) == 3
    assert [p.signal for p in procs.values()] == [None, None]


def test_an_engine_that_dies_before_it_registers_is_started_again_later_and_the_old_serve_on():
    launch, clock = Launch(), Clock()
    supervisor = Supervisor([{0}, {1}], prefill=0, clock=clock)
    supervisor.start(launch)
    procs = launch.stack.procs
    supervisor.act(health(SPLIT, "decode-0"), launch)  # prefill-1 and decode-2 start
    del procs["decode-2"]  # dies loading
    supervisor.act(health(SPLIT, "decode-0", "prefill-1"), launch)
    assert len(launch.started) == 3  # not at once: it waits 2 s (then 4, 8 ... up to 60)
    assert procs["decode-0"].signal is None  # the old engine serves until the new are in
    clock.now += 2
    supervisor.act(health(SPLIT, "decode-0", "prefill-1"), launch)
    assert launch.started[3] == ("decode-3", [1])
    clock.now += 400  # never registers: killed, and started again after the back-off
    supervisor.act(health(SPLIT, "decode-0", "prefill-1"), launch)
    assert procs["decode-3"].signal == "KILL" and procs["decode-0"].signal is None


def test_a_split_outside_the_shares_or_a_gateway_that_says_nothing_changes_nothing():
    launch = Launch()
    supervisor = Supervisor([{0}, {1}], prefill=1, clock=Clock())
    supervisor.start(launch)
    for body in ({}, health({"prefill": 2, "decode": 0}), health({"decode": 2}), {"desired": 3}):
        supervisor.act(body, launch)
    assert launch.started == [("prefill-0", [0]), ("decode-1", [1])]
    assert [p.signal for p in launch.stack.procs.values()] == [None, None]


def test_a_move_taken_back_before_its_engines_are_in_keeps_the_old_ones():
    launch = Launch()
    supervisor = Supervisor([{0}, {1}], prefill=0, clock=Clock())
    supervisor.start(launch)
    procs = launch.stack.procs
    supervisor.act(health(SPLIT, "decode-0"), launch)  # prefill-1 and decode-2 start
    aggregated = {"prefill": 0, "decode": 2}
    supervisor.act(health(aggregated, "decode-0", "prefill-1", "decode-2"), launch)
    assert [procs[n].signal for n in ("decode-0", "prefill-1", "decode-2")] == [
        None,
        "TERM",
        "TERM",
    ]
    assert len(launch.started) == 3
