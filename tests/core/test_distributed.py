"""gather_with_grad on two real CPU processes (gloo), against one process on the whole batch."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from leccr_core.config import LeccrConfig
from leccr_core.distributed import gather_with_grad, is_distributed
from leccr_core.losses import itc_loss, local_loss, slot_diversity_loss, total_loss

WORLD, N, E, D, K, T = 2, 6, 8, 5, 2, 3     # N rows per rank
CFG = dict(w_reg=0.05, w_cap=0.1, w_dstl=0.3, w_cv=0.2)


def global_data():
    """The global batch (identical on every process) and the shared 'model' weights."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    data = dict(v=r(WORLD * N, E), s=r(WORLD * N, E), t=r(WORLD * N, E), m=r(WORLD * N, K, E),
                slots=r(WORLD * N, K, D), cvs=r(WORLD * N, K, D), cvt=r(WORLD * N, T, D),
                mask=(torch.rand(WORLD * N, T, generator=g) > 0.3).long().clamp_min_(0))
    data["mask"][:, 0] = 1
    data["ids"] = torch.tensor([0, 1, 2, 0, 3, 4, 5, 1, 6, 7, 3, 8])    # repeats cross the rank boundary
    lin_e, lin_d = torch.nn.Linear(E, E), torch.nn.Linear(D, D)
    with torch.no_grad():
        for p in (*lin_e.parameters(), *lin_d.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return data, lin_e, lin_d


def outputs(data, lin_e, lin_d, rows):
    return SimpleNamespace(
        v_hat=F.normalize(lin_e(data["v"][rows]), dim=-1), h_s=F.normalize(lin_e(data["s"][rows]), dim=-1),
        h_t=F.normalize(lin_e(data["t"][rows]), dim=-1), m_hat=lin_e(data["m"][rows]),
        slots=lin_d(data["slots"][rows]), cv_slots=lin_d(data["cvs"][rows]), cv_tokens=lin_d(data["cvt"][rows]),
        visual_mask=data["mask"][rows], tau=torch.tensor(0.07))


def _worker(rank, port, folder):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        data, lin_e, lin_d = global_data()
        rows = slice(rank * N, (rank + 1) * N)
        result = {"distributed": is_distributed()}
        for mode in ("local", "sum"):
            # plain ITC on leaf shards: value and the local shard's gradient
            a = data["v"][rows].clone().requires_grad_()
            b = data["s"][rows].clone().requires_grad_()
            ids = gather_with_grad(data["ids"][rows], mode)
            loss = itc_loss(gather_with_grad(a, mode), gather_with_grad(b, mode), ids, 0.1)
            loss.backward()
            result[mode] = dict(itc=loss.detach(), ids=ids, grad_a=a.grad, grad_b=b.grad)
            # total_loss through shared weights, then a DDP-style gradient average
            lin_e.zero_grad(), lin_d.zero_grad()
            tl, parts = total_loss(outputs(data, lin_e, lin_d, rows), data["ids"][rows],
                                   LeccrConfig(gather_grad=mode, **CFG))
            tl.backward()
            grads = []
            for p in (*lin_e.parameters(), *lin_d.parameters()):
                dist.all_reduce(p.grad)
                grads.append(p.grad / WORLD)
            result[mode].update(parts=parts, ddp_grads=grads)
        torch.save(result, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(free_port(), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_noop_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert not is_distributed() and gather_with_grad(x) is x


@pytest.mark.parametrize("mode", ["local", "sum"])
def test_gathered_itc_equals_single_process(ranks, mode):
    data, _, _ = global_data()
    a = data["v"].clone().requires_grad_()
    b = data["s"].clone().requires_grad_()
    ref = itc_loss(a, b, data["ids"], 0.1)
    ref.backward()
    scale = 1.0 if mode == "local" else WORLD      # "sum": every rank's gradient of its own loss copy
    for r, res in enumerate(ranks):
        assert res["distributed"]
        got = res[mode]
        assert torch.equal(got["ids"], data["ids"])
        assert got["itc"].item() == pytest.approx(ref.item(), rel=1e-6)
        rows = slice(r * N, (r + 1) * N)
        assert got["grad_a"].abs().sum() > 0        # gradients reach the local shard
        assert torch.allclose(got["grad_a"], scale * a.grad[rows], atol=1e-6)
        assert torch.allclose(got["grad_b"], scale * b.grad[rows], atol=1e-6)


@pytest.mark.parametrize("mode", ["local", "sum"])
def test_total_loss_gathered_parts_and_ddp_gradient(ranks, mode):
    data, lin_e, lin_d = global_data()
    cfg = LeccrConfig(**CFG)
    full = outputs(data, lin_e, lin_d, slice(None))
    _, full_parts = total_loss(full, data["ids"], cfg)
    shards = [outputs(data, lin_e, lin_d, slice(r * N, (r + 1) * N)) for r in range(WORLD)]
    for r, res in enumerate(ranks):
        parts = res[mode]["parts"]
        for k in ("itc_vs", "itc_vt", "kl", "itc_st", "cv"):          # gathered: whole-batch values
            assert parts[k].item() == pytest.approx(full_parts[k].item(), rel=1e-5), k
        sh = shards[r]                                               # per-rank terms: this shard only
        assert parts["loc_s"].item() == pytest.approx(local_loss(sh.m_hat, sh.h_s, 0.07).item(), rel=1e-5)
        assert parts["reg"].item() == pytest.approx(slot_diversity_loss(sh.slots).item(), rel=1e-5)
        assert parts["loc_s"].item() != pytest.approx(full_parts["loc_s"].item(), rel=1e-3)

    # the objective one process on the global batch would optimise: gathered terms on the whole
    # batch, per-rank terms averaged over ranks (what DDP does with them)
    g_part, _ = total_loss(full, data["ids"], LeccrConfig(**{**CFG, "w_cap": 0.0, "w_reg": 0.0}))
    l_part = sum(cfg.w_cap * (local_loss(s.m_hat, s.h_s, 0.07) + local_loss(s.m_hat, s.h_t, 0.07))
                 + cfg.w_reg * slot_diversity_loss(s.slots) for s in shards) / WORLD
    params = [*lin_e.parameters(), *lin_d.parameters()]
    g_grads = torch.autograd.grad(g_part, params, retain_graph=True)
    l_grads = torch.autograd.grad(l_part, params)
    # "sum": exactly the single-process gradient; "local": the gathered terms count 1/WORLD
    g_scale = 1.0 if mode == "sum" else 1.0 / WORLD
    for got, gg, lg in zip(ranks[0][mode]["ddp_grads"], g_grads, l_grads):
        assert torch.allclose(got, g_scale * gg + lg, atol=1e-5)
    for got0, got1 in zip(ranks[0][mode]["ddp_grads"], ranks[1][mode]["ddp_grads"]):
        assert torch.equal(got0, got1)
