"""Peak memory of a process tree: the converters and the benchmarks report it."""
import threading

import psutil


class PeakRSS:
    """Peak memory of this process and all its descendants, summed over processes.

    Two sums: RSS (sampled every 0.1 s; counts pages shared between processes, such as libraries
    and memory inherited through fork, once per process, so it overstates) and PSS (each shared
    page split among its sharers, so the sum is what the tree really holds; sampled every 1 s
    because the kernel takes ~10 ms per process to compute it).
    """

    def __init__(self, interval_s: float = 0.1, pss_every: int = 10):
        self.interval_s, self.pss_every = interval_s, pss_every
        self.peak_rss_bytes = self.peak_pss_bytes = 0
        self._stop = threading.Event()

    def _sample(self, pss: bool):
        me = psutil.Process()
        rss = pss_total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                rss += p.memory_info().rss
                pss_total += p.memory_full_info().pss if pss else 0
            except psutil.Error:  # exited between listing and reading
                pass
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        self.peak_pss_bytes = max(self.peak_pss_bytes, pss_total)

    def _run(self):
        n = 0
        while not self._stop.wait(self.interval_s):
            n += 1
            self._sample(pss=n % self.pss_every == 0)

    def __enter__(self):
        self._sample(pss=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss_bytes / 2**20

    @property
    def peak_pss_mb(self) -> float:
        return self.peak_pss_bytes / 2**20
