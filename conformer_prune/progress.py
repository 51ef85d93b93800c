"""Progress of long loops that reads well both in a terminal and in a log file.

A tqdm bar redraws one line with carriage returns: right for a person at a terminal, but a log
file (`results/*.log`, CI output) gets every redraw on one ever-growing line. When the stream
is not a terminal, `progress()` prints a plain line instead every `every_seconds` or every
`every_percent` (if at least `min_seconds` have passed), whichever comes first, plus one at the
end. tqdm has no such mode, hence this
small class.
"""

import sys
import time

from tqdm import tqdm


def progress(total, desc, unit="it", enabled=True, stream=None, every_seconds=30.0,
             every_percent=10.0):
    """A tqdm bar on a terminal, a `LineProgress` otherwise; both have update(n) and close()."""
    stream = stream or sys.stderr
    if not enabled:
        return tqdm(total=total, disable=True)
    if _is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, file=stream)
    return LineProgress(total, desc, unit, stream, every_seconds, every_percent)


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False


class LineProgress:
    """Prints `desc: done/total unit (pct%), rate unit/s, eta` as whole lines, now and then."""

    def __init__(self, total, desc, unit, stream, every_seconds, every_percent, clock=None,
                 min_seconds=2.0):
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.every_seconds, self.every_percent = every_seconds, every_percent
        self.min_seconds = min_seconds
        self.clock = clock or time.monotonic
        self.started = self.last_time = self.clock()
        self.done = 0
        self.last_percent = 0.0
        self.closed = False
        self.postfix = ""  # appended to every line, e.g. the running loss

    def update(self, n=1):
        self.done += n
        now = self.clock()
        percent = 100.0 * self.done / self.total if self.total else 0.0
        since = now - self.last_time
        # By percent only if some time has passed too: a fast loop gets just its closing line.
        if since >= self.every_seconds or (percent - self.last_percent >= self.every_percent
                                           and since >= self.min_seconds):
            self._write(now)
            self.last_time, self.last_percent = now, percent

    def close(self):
        if not self.closed:
            self.closed = True
            self._write(self.clock(), final=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _write(self, now, final=False):
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        line = f"{self.desc}: {self.done}"
        if self.total:
            line += f"/{self.total} {self.unit} ({100.0 * self.done / self.total:.0f}%)"
        else:
            line += f" {self.unit}"
        line += f", {rate:.1f} {self.unit}/s, {_clock_text(elapsed)} elapsed"
        if self.total and not final and rate > 0:
            line += f", eta {_clock_text((self.total - self.done) / rate)}"
        if self.postfix:
            line += f", {self.postfix}"
        print(line, file=self.stream, flush=True)


def _clock_text(seconds):
    seconds = int(round(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
