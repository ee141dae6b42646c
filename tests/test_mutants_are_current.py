"""tests/mutation.py names each mutant by a line of the source; a refactor that changes the line
leaves the mutant stale (reported as such only when the slow script runs). Check here that
every mutant's original text still occurs exactly once."""

import os

import mutation


def test_every_mutant_finds_its_line():
    stale = []
    for i, m in enumerate(mutation.MUTANTS):
        with open(os.path.join(mutation.ROOT, m.path)) as fh:
            if fh.read().count(m.old) != 1:
                stale.append(f"{i}: {m.path}: {m.old!r}")
    assert not stale, stale
