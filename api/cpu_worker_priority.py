"""Imported first by the fork server of the CPU workers (`api.cpu_work.PRELOAD`), and only there: it lowers that
process's CPU priority before it imports torch, and every worker forked from it inherits the priority. So on a
machine whose cores the API shares with its workers, the event loop is scheduled ahead of a pre-flight's arithmetic.
Never import it in the API's own process."""

import os

NICENESS = 10

os.nice(NICENESS)
