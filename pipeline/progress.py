"""Progress of the encode stage: one bar over the whole run (shards, tiles, tiles/s, ETA), a line per shard
when it lands, and the measured rates for the summary. No Ray here; the driver feeds it shard summaries."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class Progress:
    shards_total: int  # shards this run encodes
    quiet: bool = False
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    shards_done: int = 0
    images: int = 0
    tiles: int = 0
    start: float = field(default_factory=time.perf_counter)  # encoding starts (actors are being created)
    first: float | None = None  # when the first shard landed (durable on disk)
    first_tiles: int = 0
    first_began: float | None = None  # wall clock: when a worker first began a shard (encoders loaded)
    first_landed: float | None = None  # wall clock: when the first shard landed
    shard_seconds: list[float] = field(default_factory=list)  # each shard's own work, as its worker timed it

    def __post_init__(self):
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def landed(self, shard: int, summary: dict, times: tuple[float, float] | None = None) -> None:
        """Shard `shard` is on disk; summary: its counts (images, tiles, ...); times: (began, ended) on the
        worker's wall clock."""
        now = time.perf_counter()
        if times is not None:
            began, ended = times
            self.first_began = began if self.first_began is None else min(self.first_began, began)
            self.first_landed = self.first_landed or time.time()
            self.shard_seconds.append(ended - began)
        self.shards_done += 1
        self.images += summary.get("images", 0)
        self.tiles += summary["tiles"]
        if self.first is None:
            self.first, self.first_tiles = now, self.tiles
        if self.quiet:
            return
        line = f"[data] shard {shard:05d} written: {summary.get('images', '-')} images, {summary['tiles']} tiles"
        if self.tty:  # the line above the bar, then the bar redrawn in place
            self.stream.write(f"\r\033[K{line}\n{self.bar()}")
        else:
            self.stream.write(f"{line} | {self.bar()}\n")
        self.stream.flush()

    def bar(self, width: int = 24) -> str:
        elapsed = time.perf_counter() - self.start
        frac = self.shards_done / max(self.shards_total, 1)
        filled = int(frac * width)
        eta = elapsed / self.shards_done * (self.shards_total - self.shards_done) if self.shards_done else 0.0
        return (f"[{'#' * filled}{'.' * (width - filled)}] {self.shards_done}/{self.shards_total} shards, "
                f"{self.tiles} tiles, {self.tiles / max(elapsed, 1e-9):.1f} tiles/s, ETA {_duration(eta)}")

    def close(self) -> None:
        if self.tty and not self.quiet and self.shards_done:
            self.stream.write("\n")
            self.stream.flush()

    def stats(self) -> dict:
        """This run's timing (kept out of the manifest: it would make rebuilt datasets differ). `steady_*`
        starts when the first shard landed, leaving out actor start-up and VAE loading."""
        now = time.perf_counter()
        first = self.first if self.first is not None else now
        shard_time = statistics.median(self.shard_seconds) if self.shard_seconds else None
        return dict(tiles=self.tiles, images=self.images, shards=self.shards_done, seconds=now - self.start,
                    first_shard_seconds=(self.first - self.start) if self.first is not None else None,
                    # from the moment a worker began encoding (VAEs loaded) to the first shard on disk
                    first_shard_after_encoding=(self.first_landed - self.first_began)
                    if self.first_landed is not None else None,
                    first_began=self.first_began, median_shard_seconds=shard_time,
                    steady_tiles=self.tiles - self.first_tiles, steady_seconds=now - first)

    def summary(self) -> str:
        s = self.stats()
        rate = s["tiles"] / max(s["seconds"], 1e-9)
        text = f"this run {s['tiles']} tiles in {s['seconds']:.1f} s ({rate:.2f} tiles/s"
        if s["steady_seconds"] > 0 and s["shards"] > 1:
            text += f"; {s['steady_tiles'] / s['steady_seconds']:.2f} tiles/s after the first shard"
        return text + ")"
