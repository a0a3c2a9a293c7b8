"""In-process clusters by worker count for a test module (one cluster per process at a
time: asking for another count shuts the last one down).

Example (in a test module)::

    _cluster = LocalClusters()

    @pytest.fixture(scope="module", autouse=True)
    def _shutdown_clusters():
        yield
        _cluster.close()
"""
import distgrad as dg


class LocalClusters:
    def __init__(self):
        self.held = {}

    def __call__(self, n):
        """The in-process cluster with ``n`` workers."""
        if n not in self.held:
            self.close()
            self.held[n] = dg.init(workers=n, backend="local", timeout_s=30)
        return self.held[n]

    def close(self):
        for c in self.held.values():
            c.shutdown()
        self.held.clear()
