"""Named crash points for the reliability tests: `EDITSERVE_CRASH_AT=<point>` kills the process.

The journal's guarantees (no committed edit lost, no half edit) are about what happens when the
process dies between two steps of an edit. A test can only check that by dying there, so the
commit path calls `crash_point(name)` between its steps. Unset (always, outside tests) it costs one
dictionary lookup. SIGKILL, not an exception: nothing gets to clean up, as with kill -9.
"""

from __future__ import annotations

import os
import signal

# The steps of an edit's commit, in order (editserve.edits.service).
POINTS = (
    "before_payload",  # computed, nothing written yet
    "after_payload",  # the payload file is durable, no journal row yet
    "after_row",  # the row is pending, the live weights are untouched
    "during_apply",  # the live weights changed, the row is not yet marked applied
    "during_undo",  # an undo is journaled, the live weights still hold the edit
)

# The steps of a rebase (DELETE ?rebase=true; editserve.edits.rebase), after its undo.
REBASE_POINTS = (
    "after_rebase_payload",  # the later edits' new payloads are durable, no row names them yet
    "after_rebase_switch",  # the rows name the new payloads, the old files are not deleted yet
)


def crash_point(name: str) -> None:
    if os.environ.get("EDITSERVE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
