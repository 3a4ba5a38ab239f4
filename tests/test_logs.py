"""What a user's log file gets: plain text, whatever Ray forwards."""

import io
import os
import sys


class Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_codes_are_dropped_from_streams_that_are_not_a_terminal(monkeypatch):
    from w2s_ray.raytools import PlainText, plain_text_logs

    out, err = Terminal(), Pipe()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    plain_text_logs()
    plain_text_logs()  # twice: wrapped once
    assert sys.stdout is out and isinstance(sys.stderr, PlainText) and sys.stderr.stream is err
    # what Ray's log deduplication prints, and a coloured task prefix
    print("\x1b[36m(student_task pid=1)\x1b[0m epoch 10/25\x1b[32m [repeated 8x across cluster]\x1b[0m", file=sys.stderr)
    assert err.getvalue() == "(student_task pid=1) epoch 10/25 [repeated 8x across cluster]\n"
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
