"""``distgrad.utils.data``: PyTorch's datasets, samplers and DataLoader, and the loader that
shards every global batch across a cluster (``DataLoader(..., cluster=cluster)``)."""
import collections
import warnings

import numpy as np
import pytest

import distgrad as dg
import distgrad.nn as nn
import distgrad.nn.functional as F
from distgrad.utils.data import (BatchSampler, ConcatDataset, DataLoader, Dataset,
                                 IterableDataset, RandomSampler, SequentialSampler, Subset,
                                 SubsetRandomSampler, TensorDataset, default_collate, random_split)

RNG = np.random.default_rng(5)


def _rows(batches):
    """Every sample id yielded, in order (the id is column 0 of x)."""
    return [int(v) for xb, _ in batches for v in xb.numpy()[:, 0]]


def _dataset(n, d=3):
    X = np.concatenate([np.arange(n, dtype=np.float32)[:, None],
                        RNG.standard_normal((n, d - 1)).astype(np.float32)], axis=1)
    return TensorDataset(X, np.arange(n) % 4)


# ---------------------------------------------------------------- local loading

@pytest.mark.parametrize("n,batch,drop_last", [(10, 4, False), (10, 4, True), (8, 4, False),
                                               (3, 5, False), (3, 5, True)])
def test_batches_cover_the_epoch_as_pytorch_does(n, batch, drop_last):
    loader = DataLoader(_dataset(n), batch_size=batch, drop_last=drop_last)
    batches = list(loader)
    assert len(batches) == len(loader)
    kept = (n // batch) * batch if drop_last else n
    assert _rows(batches) == list(range(kept))
    torch = pytest.importorskip("torch")
    tl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.arange(n)), batch_size=batch, drop_last=drop_last)
    assert [len(b[0]) for b in tl] == [len(b[0]) for b in batches] and len(tl) == len(loader)


def test_shuffle_is_a_permutation_reproducible_with_a_seeded_generator():
    ds = _dataset(23)

    def epoch(gen):
        return _rows(DataLoader(ds, batch_size=5, shuffle=True, generator=gen))
    a = epoch(dg.Generator().manual_seed(7))
    assert sorted(a) == list(range(23)) and a != list(range(23))
    assert epoch(dg.Generator().manual_seed(7)) == a
    assert epoch(dg.Generator().manual_seed(8)) != a
    loader = DataLoader(ds, batch_size=5, shuffle=True, generator=dg.Generator().manual_seed(7))
    assert _rows(loader) == a and _rows(loader) != a         # a new order every epoch
    dg.manual_seed(1)
    b = epoch(None)                                          # the global generator
    dg.manual_seed(1)
    assert epoch(None) == b


def test_batches_of_a_tensor_dataset_are_the_stacked_samples():
    ds = _dataset(7)
    xb, yb = next(iter(DataLoader(ds, batch_size=4, sampler=[6, 1, 1, 3])))
    stacked = default_collate([ds[i] for i in [6, 1, 1, 3]])
    np.testing.assert_array_equal(xb.numpy(), stacked[0].numpy())
    np.testing.assert_array_equal(yb.numpy(), stacked[1].numpy())
    assert yb.dtype == np.int64


def test_default_collate_handles_numpy_tensors_numbers_tuples_dicts_as_pytorch():
    Point = collections.namedtuple("Point", "x y")
    samples = [{"img": np.full((2, 2), i, np.float32), "label": i, "w": 0.5 * i,
                "t": dg.tensor([i, i]), "name": f"s{i}", "pair": (i, np.float32(i)),
                "p": Point(i, [i, 1])} for i in range(3)]
    b = default_collate(samples)
    assert b["img"].shape == (3, 2, 2) and b["img"].dtype == np.float32
    assert b["label"].dtype == np.int64 and b["label"].tolist() == [0, 1, 2]
    assert b["w"].dtype == np.float64
    assert b["t"].tolist() == [[0, 0], [1, 1], [2, 2]]
    assert b["name"] == ["s0", "s1", "s2"]
    assert isinstance(b["pair"], list) and b["pair"][1].dtype == np.float32
    assert isinstance(b["p"], Point) and b["p"].y[1].tolist() == [1, 1, 1]
    torch = pytest.importorskip("torch")
    tb = torch.utils.data.default_collate([{k: v for k, v in s.items() if k not in ("t", "p")}
                                           for s in samples])
    for k in ["img", "label", "w"]:
        assert str(b[k].dtype) == str(tb[k].dtype).split(".")[1]
        np.testing.assert_array_equal(b[k].numpy(), tb[k].numpy())
    with pytest.raises(TypeError, match="default_collate"):
        default_collate([object(), object()])
    with pytest.raises(RuntimeError, match="equal size"):
        default_collate([[1, 2], [1]])


def test_custom_datasets_samplers_and_no_batching():
    class Squares(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return np.array([i], np.float32), i * i

    xs, ys = zip(*DataLoader(Squares(), batch_size=4))
    assert [y.tolist() for y in ys] == [[0, 1, 4, 9], [16, 25]]
    single = list(DataLoader(Squares(), batch_size=None))
    assert len(single) == 6 and single[2][1] == 4 and single[2][0].shape == (1,)
    assert list(SequentialSampler(range(3))) == [0, 1, 2]
    assert sorted(SubsetRandomSampler([4, 8, 9], generator=dg.Generator().manual_seed(0))) == [4, 8, 9]
    draws = list(RandomSampler(range(3), replacement=True, num_samples=50,
                               generator=dg.Generator().manual_seed(0)))
    assert len(draws) == 50 and set(draws) <= {0, 1, 2}
    assert len(list(RandomSampler(range(4), num_samples=10))) == 10
    bs = BatchSampler(SequentialSampler(range(7)), 3, drop_last=False)
    assert list(bs) == [[0, 1, 2], [3, 4, 5], [6]] and len(bs) == 3
    loader = DataLoader(Squares(), batch_sampler=[[5, 0], [2]])
    assert [y.tolist() for _, y in loader] == [[25, 0], [4]]


def test_iterable_dataset_is_batched_in_stream_order():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(np.arange(7, dtype=np.float32))

    assert [b.tolist() for b in DataLoader(Stream(), batch_size=3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert len(list(DataLoader(Stream(), batch_size=3, drop_last=True))) == 2
    with pytest.raises(ValueError, match="IterableDataset"):
        DataLoader(Stream(), shuffle=True)


def test_subset_concat_and_random_split():
    ds = _dataset(10)
    parts = random_split(ds, [0.7, 0.3], generator=dg.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [7, 3]
    ids = sorted(int(p[i][0].numpy()[0]) for p in parts for i in range(len(p)))
    assert ids == list(range(10))
    assert [len(p) for p in random_split(ds, [4, 6])] == [4, 6]
    with pytest.raises(ValueError, match="sum of input lengths"):
        random_split(ds, [4, 4])
    both = ConcatDataset([Subset(ds, [9, 8]), ds])
    assert len(both) == 12 and int(both[0][0].numpy()[0]) == 9 and int(both[-1][0].numpy()[0]) == 9
    assert len(ds + ds) == 20


def test_loader_arguments_pytorch_rejects_and_the_workers_warning():
    ds = _dataset(4)
    with pytest.raises(ValueError, match="mutually exclusive"):
        DataLoader(ds, sampler=[0, 1], shuffle=True)
    with pytest.raises(ValueError, match="mutually exclusive"):
        DataLoader(ds, batch_sampler=[[0]], batch_size=2)
    with pytest.raises(ValueError, match="Size mismatch"):
        TensorDataset(np.ones((3, 2)), np.ones(4))
    with pytest.warns(UserWarning, match="num_workers=2"):
        loader = DataLoader(ds, batch_size=2, num_workers=2, pin_memory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _rows(loader) == [0, 1, 2, 3]


# ---------------------------------------------------------------- sharded across a cluster

@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("n,batch,shuffle", [(11, 4, True), (10, 4, False), (6, 5, True)])
def test_sharded_loader_yields_the_local_batches_with_no_sample_lost_or_repeated(
        workers, n, batch, shuffle):
    ds = _dataset(n)
    local = DataLoader(ds, batch_size=batch, shuffle=shuffle,
                       generator=dg.Generator().manual_seed(3))
    with dg.init(workers=workers, backend="local") as cluster:
        sharded = DataLoader(ds, batch_size=batch, shuffle=shuffle, cluster=cluster,
                             generator=dg.Generator().manual_seed(3))
        assert len(sharded) == len(local)
        for epoch in range(2):
            seen = []
            for (xl, yl), (xs, ys) in zip(local, sharded):
                assert xs.placement == dg.Shard(0) and ys.placement == dg.Shard(0)
                assert len(xs.placement.sizes) == workers
                rows = [int(v) for v in xs.numpy()[:, 0]]
                assert sorted(rows) == sorted(int(v) for v in xl.numpy()[:, 0])
                order = np.argsort(xl.numpy()[:, 0])
                np.testing.assert_array_equal(np.sort(ys.numpy()[np.argsort(xs.numpy()[:, 0])]),
                                              np.sort(yl.numpy()[order]))
                seen += rows
            assert sorted(seen) == list(range(n)), f"epoch {epoch}"


def test_sharded_loader_trains_to_the_single_process_losses():
    """Global batch semantics: the same losses and weights as one process, to 1e-5."""
    n, batch = 50, 16                          # the last batch (2 rows) is smaller than 3 workers
    X = RNG.standard_normal((n, 6)).astype(np.float32)
    y = RNG.integers(0, 3, n)
    ds = TensorDataset(X, y)

    def train(cluster):
        dg.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        if cluster is not None:
            cluster.replicate(model)
        opt = dg.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        loader = DataLoader(ds, batch_size=batch, shuffle=True, cluster=cluster,
                            generator=dg.Generator().manual_seed(11))
        losses = []
        for _ in range(2):
            for xb, yb in loader:
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses, [p.detach().numpy().copy() for p in model.parameters()]

    ref_losses, ref_params = train(None)
    with dg.init(workers=3, backend="local") as cluster:
        losses, params = train(cluster)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for p, q in zip(params, ref_params):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)


def test_a_tensor_dataset_is_sent_to_the_workers_once():
    n, d = 2000, 50
    ds = TensorDataset(RNG.standard_normal((n, d)).astype(np.float32), np.arange(n))
    with dg.init(workers=2, backend="local") as cluster:
        shipped = []
        add_source = cluster.gang.add_source

        def counting(payloads, ranks):
            shipped.append(sum(len(data) + sum(a.nbytes for a in side) for data, side, _ in payloads))
            return add_source(payloads, ranks)
        cluster.gang.add_source = counting
        loader = DataLoader(ds, batch_size=100, shuffle=True, cluster=cluster)
        received = []
        for _ in range(3):
            for xb, yb in loader:
                xb.sum().item()
            received.append(sum(w["bytes_in"] for w in cluster.stats()))
    data_bytes = n * d * 4 + n * 8
    assert len(shipped) == 1 and data_bytes <= shipped[0] < data_bytes * 1.01   # once, at first use
    assert received[0] < data_bytes / 10                  # the steps carry only row numbers
    assert received[2] - received[1] < data_bytes / 10


def test_a_dataset_that_is_not_arrays_is_collated_here_and_sharded_per_step():
    class Pairs(Dataset):
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return {"x": np.full(2, i, np.float32), "y": i}

    with dg.init(workers=2, backend="local") as cluster:
        batches = list(DataLoader(Pairs(), batch_size=3, cluster=cluster))
        assert [b["x"].placement.sizes for b in batches] == [(2, 1), (2, 1), (1, 0)]
        assert [b["y"].numpy().tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]


def test_take_rows_refuses_rows_a_worker_does_not_hold():
    with dg.init(workers=2, backend="local") as cluster:
        data = cluster.shard(np.arange(8, dtype=np.float32).reshape(4, 2))
        with pytest.raises(dg.distributed.PlacementError, match="indices of its own rows"):
            data.apply("take_rows", dg.tensor([0, 1]))
        wrong = cluster.shard(np.array([3, 0]), sizes=[1, 1])   # worker 0 asked for row 3
        with pytest.raises(dg.distributed.RemoteError, match="take_rows: row indices"):
            data.apply("take_rows", wrong).numpy()


@pytest.mark.ray
def test_sharded_loader_on_ray_workers_matches_one_process(ray_session):
    n = 37
    X = RNG.standard_normal((n, 5)).astype(np.float32)
    y = RNG.integers(0, 2, n)
    ds = TensorDataset(X, y)
    gen = dg.Generator().manual_seed(2)
    w = RNG.standard_normal((5, 2)).astype(np.float32)
    local = [F.cross_entropy(xb @ dg.from_numpy(w), yb).item()
             for xb, yb in DataLoader(ds, batch_size=8, shuffle=True, generator=gen)]
    with dg.init(workers=2, backend="ray", address="auto") as cluster:
        W = cluster.replicate(dg.from_numpy(w))
        loader = DataLoader(ds, batch_size=8, shuffle=True, cluster=cluster,
                            generator=dg.Generator().manual_seed(2))
        sharded = [F.cross_entropy(xb @ W, yb).item() for xb, yb in loader]
    np.testing.assert_allclose(sharded, local, rtol=1e-5)
