"""What the sink holds for each scan id: one record, not a dict per concern.

A record lives from the first message naming its scan (a result page may overtake its
scan_start) until the sink forgets it; a scan finished by an earlier sink (its summary
``<scan>.json`` is in the output folder) is a record with ``done`` set and no maps, so
late duplicates are still acknowledged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .journal import Journal
from .protocol import Message
from .scan_state import ScanState


@dataclass
class ScanRecord:
    scan: str
    state: ScanState | None = None  # the maps; None before the scan_start and once forgotten
    run: str | None = None  # the run that started it
    runs: set = field(default_factory=set)  # its runs: the first, and a publisher's restarts (``restart``)
    done: bool = False  # finished (here or by an earlier sink): acknowledge, change nothing
    journal: Journal | None = None  # open while the scan runs
    dispatcher: bytes | None = None  # routing id of the dispatcher publishing it: where acks go
    acks: list[int] = field(default_factory=list)  # pages stored, not yet told
    # Finished with every point in, not yet told: "stored ... complete" releases every page the
    # dispatcher still holds, so one acknowledgement lost at the end of a scan (or a page re-sent
    # after it) cannot keep a publisher waiting on a sink that is done.
    complete_untold: bool = False
    unjournaled: set[int] = field(default_factory=set)  # pages whose journal write failed: not acknowledged
    deadline: float | None = None  # monotonic time after which a scan that ended is finished as it is
    orphans: list[tuple[Message, list | None]] = field(default_factory=list)  # results before the scan_start

    @property
    def owes_word(self) -> bool:
        return bool(self.acks) or self.complete_untold

    def close_journal(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None
