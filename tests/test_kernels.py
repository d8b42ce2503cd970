"""The hand-written kernels equal the reference vmap(grad(sae.loss)): per step and after training."""

import ctypes

import pytest
import torch
import torchopt
from test_ensemble import D_IN, MIXED, STEPS, sparse_batches

from sae_ensemble.ensemble import Ensemble
from sae_ensemble.execution import Execution
from sae_ensemble.kernels import adam, auxk, dense, native, sparse
from sae_ensemble.member import Member

TOPK = [
    Member("topk", D_IN, 64, k=4, seed=5),
    Member("topk", D_IN, 32, k=8, lr=2e-3, seed=6, lr_warmup_steps=5),
    Member("topk", D_IN, 48, k=3, bias_decay=0.1, seed=1, use_b_dec=False),
    Member("topk", D_IN, 48, k=6, bias_decay=0.05, lr=3e-3, seed=2, lr_decay_steps=15),
]


def train(members, execution, micro_batches=1, steps=STEPS, row_chunk=None):
    pinned = Execution(execution, row_chunk) if row_chunk else execution
    ensemble = Ensemble(members, total_steps=steps, execution=pinned, micro_batches=micro_batches)
    for batch in sparse_batches(steps):
        ensemble.step(batch)
    return ensemble


def assert_same_members(a: Ensemble, b: Ensemble, atol: float = 1e-5) -> None:
    for index in range(len(a)):
        params_a, moments_a = a.member_state(index)
        params_b, moments_b = b.member_state(index)
        for name in params_a:
            torch.testing.assert_close(params_a[name], params_b[name], atol=atol, rtol=0, msg=f"member {index} {name}")
    assert torch.equal(a.alive.cpu(), b.alive.cpu())


@pytest.fixture(scope="module")
def reference_mixed():
    return train(MIXED, "reference")


@pytest.mark.parametrize("row_chunk", [None, 24])
def test_fused_training_equals_reference_for_every_variant(reference_mixed, row_chunk):
    # MIXED: relu, tied and topk; 4 dict sizes; per-member l1, k, lr, bias decay, warmups, decay, no b_dec.
    assert_same_members(train(MIXED, "fused", row_chunk=row_chunk), reference_mixed)


@pytest.mark.parametrize("passes", [None, "torch", "transposed"], ids=["default", "at-d-columns", "feature-major"])
def test_fused_training_without_the_c_kernels_equals_reference(reference_mixed, monkeypatch, passes):
    # Where no C compiler is found, the fused step runs ReLU, the firing counts and Adam as torch ops:
    # eagerly with augmented GEMMs by default; at d columns, the torch passes that torch.compile fuses,
    # on row-major or feature-major tiles.
    monkeypatch.setattr(native, "available", lambda: False)
    ensemble = Ensemble(MIXED, total_steps=STEPS, execution=Execution("fused", 24, passes))
    for batch in sparse_batches(STEPS):
        ensemble.step(batch)
    assert_same_members(ensemble, reference_mixed)


@pytest.mark.parametrize("members", ["topk", "mixed"])
def test_sparse_training_without_the_c_kernels_equals_reference(members, reference_mixed, monkeypatch):
    # Without a C compiler (and on CUDA) the sparse backward is torch's sparse products over the transposed pattern.
    monkeypatch.setattr(native, "available", lambda: False)
    grid, reference = (TOPK, train(TOPK, "reference")) if members == "topk" else (MIXED, reference_mixed)
    assert_same_members(train(grid, "sparse", row_chunk=24), reference)


@pytest.mark.parametrize("execution", ["fused", "sparse"])
def test_topk_kernels_equal_reference_training(execution):
    assert_same_members(train(TOPK, execution, row_chunk=20), train(TOPK, "reference"))


AUXK = [
    Member("topk", D_IN, 64, k=4, seed=5, auxk_dead_tokens=64, k_aux=8),
    Member("topk", D_IN, 48, k=3, seed=1, auxk_dead_tokens=128, auxk_coefficient=0.5),  # k_aux: d_in // 2
    Member("topk", D_IN, 32, k=8, lr=2e-3, seed=6),  # AuxK off
]


@pytest.mark.parametrize(
    "members", [AUXK, AUXK + [Member("relu", D_IN, 48, l1=1e-3, seed=0)]], ids=["topk", "mixed-with-relu"]
)
@pytest.mark.parametrize("way", [auxk.DeadColumns, auxk.AllColumns], ids=["dead-columns (CPU)", "all-columns (CUDA)"])
def test_sparse_kernel_with_auxk_equals_reference_training(members, way, monkeypatch):
    reference = train(members, "reference")
    dead = reference.with_sparsity(reference.schedules(STEPS)[1])["dead"].sum(-1)
    assert dead[0] > 8 and dead[1] > 0 and dead[2] == 0  # AuxK had dead latents to revive: its loss ran
    ran = []
    # both ways on CPU, the first also when every member keeps all its dead latents (no top-k)
    monkeypatch.setattr(sparse, "auxk_for_step", lambda hp, *shape: ran.append(way) or way(hp, *shape[:-1]))
    assert_same_members(train(members, "sparse", row_chunk=20), reference)
    assert ran


def test_sparse_kernel_with_auxk_gives_the_reference_loss_and_gradients_in_a_step():
    reference = train(AUXK, "reference", steps=30)
    trained = reference.with_sparsity(reference.schedules(30)[1])
    few = torch.zeros_like(trained["dead"])
    few[:, [3, 17, 30]] = 1.0  # fewer dead latents than any member's k_aux: each keeps them all, no top-k
    batch = sparse_batches(1, seed=7)[0]
    for dead in (trained["dead"], few):
        hparams = {**trained, "dead": dead}
        expected, expected_aux = reference.grads(batch, hparams)
        got, aux = reference.grads(batch, hparams, Execution("sparse", 24))
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(aux["loss"], expected_aux["loss"], atol=1e-7, rtol=1e-6)
        assert (aux["loss"] > aux["mse"])[:2].all()  # the AuxK term is in the loss


@pytest.mark.parametrize("auxk_dead_tokens", [0, 64], ids=["plain", "auxk"])
def test_learned_norm_members_train_as_the_reference_in_every_kernel(auxk_dead_tokens):
    """Member.learned_decoder_norm beside unit-row members: the kernels run on sae.effective's unit-row SAE and
    take the gradients back by sae.effective_backward; the reference differentiates the loss itself. The learned
    rows leave unit norm (Adam renormalises only the others'); the saved form folds them (member_state)."""
    members = [
        Member("topk", D_IN, 64, k=4, seed=5, learned_decoder_norm=True, auxk_dead_tokens=auxk_dead_tokens, k_aux=8),
        Member("topk", D_IN, 48, k=3, bias_decay=0.1, seed=1, learned_decoder_norm=True),
        Member("topk", D_IN, 32, k=8, lr=2e-3, seed=6),
    ]
    reference = train(members, "reference")
    for execution in ["sparse"] + ([] if auxk_dead_tokens else ["fused"]):
        assert_same_members(train(members, execution, row_chunk=24), reference)
    norms = reference.params["W_dec"].norm(dim=-1)
    assert (norms[:2, :48] - 1).abs().max() > 1e-2 and torch.allclose(norms[2, :32], torch.ones(32))
    params, _ = reference.member_state(0, folded=True)
    torch.testing.assert_close(params["W_dec"].norm(dim=-1), torch.ones(64))
    with pytest.raises(ValueError, match="learned_decoder_norm=True is for topk, batchtopk, matryoshka SAEs only"):
        Member("relu", D_IN, 32, learned_decoder_norm=True)


def test_a_learned_norm_member_resumes_from_its_checkpointed_state_exactly():
    """Checkpoints keep the learned norms (member_state unfolded), so a resume continues the same optimisation."""
    members = [Member("topk", D_IN, 64, k=4, seed=5, learned_decoder_norm=True), Member("topk", D_IN, 32, k=8)]
    batches = sparse_batches(STEPS)
    whole, first = Ensemble(members, STEPS, execution="sparse"), Ensemble(members, STEPS, execution="sparse")
    for step, batch in enumerate(batches):
        whole.step(batch)
        if step < STEPS // 2:
            first.step(batch)
    resumed = Ensemble(members, STEPS, execution="sparse", init=False)
    for index in range(len(members)):
        resumed.load_member_state(index, *first.member_state(index))
    resumed.set_step(first.step_count, first.rows_seen)
    for batch in batches[STEPS // 2 :]:
        resumed.step(batch)
    assert_same_members(resumed, whole, atol=0)


def test_auto_times_the_sparse_kernel_and_not_the_fused_one_for_auxk_members():
    """All top-k: the sparse kernel alone is timed. Mixed with relu, the sparse kernel's density test needs the
    members' L0, which only the reference can measure here (no fused kernel for AuxK): it is timed too."""
    tuned = Ensemble(AUXK, total_steps=1, execution="auto")
    tuned.autotune(sparse_batches(1)[0])
    assert {c.split("(")[0] for c in tuned.autotune_report} == {"sparse"}
    mixed = Ensemble(AUXK + [Member("relu", D_IN, 48, l1=1e-3, seed=0)], total_steps=1, execution="auto")
    mixed.autotune(sparse_batches(1)[0])
    assert "reference" in mixed.autotune_report and not any(c.startswith("fused") for c in mixed.autotune_report)
    with pytest.raises(ValueError, match=r"AuxK on\) need training.execution=auto, sparse or reference"):
        Ensemble(AUXK, total_steps=1, execution="fused")


def test_sparse_kernel_equals_reference_for_every_variant(reference_mixed):
    # relu and tied members take the nonzeros of their dense codes; topk members mixed in too.
    assert_same_members(train(MIXED, "sparse", row_chunk=24), reference_mixed)


@pytest.fixture
def three_threads():
    """The C kernels split their work over torch's threads: test an uneven split even where tests run on one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(previous)


def test_the_c_topk_gives_torch_topks_values_and_indices(three_threads):
    """kernels/native.py's row top-k against torch.topk: shapes where its group-maxima bound applies and where it
    does not (k above n / 8), NaN (largest, as torch's), -inf rows, and ties (values equal; indices distinct)."""
    assert native.available(), "the C kernels did not build (a compiler is on every machine we test on)"
    check_topk_rows()


def check_topk_rows():
    generator = torch.Generator().manual_seed(0)
    for shape, k in [((8, 64, 1024), 16), ((3, 7, 100), 5), ((4, 33), 33), ((2, 5, 1000), 64), ((5, 300), 1)]:
        x = torch.randn(*shape, generator=generator)
        values, indices = native.topk_rows(x, k)
        expected = torch.topk(x, k)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices), shape
    x = torch.randn(4, 512, generator=generator)
    x[0, [5, 400]] = torch.nan
    x[1] = -torch.inf
    x[2, :] = 1.0
    values, indices = native.topk_rows(x, 8)
    expected = torch.topk(x, 8)
    assert torch.equal(values.isnan(), expected.values.isnan()) and set(indices[0, :2].tolist()) == {5, 400}
    assert torch.equal(values.nan_to_num(), expected.values.nan_to_num())
    assert torch.equal(indices[3], expected.indices[3]) and all(len(set(row.tolist())) == 8 for row in indices)
    # Few distinct values (ties at the k-th, -0.0 and 0.0 equal): the largest first, equal values by column.
    x = torch.randint(-3, 40, (64, 1024), generator=generator).float()
    x[:8] = -1.0
    for row in range(8):  # 48 zeros, every other one -0.0: all of the top 16 ties
        zeros = torch.randperm(1024, generator=generator)[:48]
        x[row, zeros] = torch.tensor([0.0, -0.0]).repeat(24)
    values, indices = native.topk_rows(x, 16)
    stable = torch.sort(x, descending=True, stable=True)
    assert torch.equal(values, stable.values[:, :16]) and torch.equal(indices, stable.indices[:, :16])


def test_the_c_selection_keeps_the_k_largest_live_entries_of_each_row_as_torch_topk_finds_them(three_threads):
    """native.keep_largest (AuxK's selection) against torch.topk over the live columns: per-member k, k above a
    row's live entries, -inf entries, k = 0, NaN (largest, as torch's) and ties (the earliest columns kept)."""
    assert native.available(), "the C kernels did not build (a compiler is on every machine we test on)"
    check_keep_largest()


def check_keep_largest():
    generator = torch.Generator().manual_seed(0)
    for M, b, n in [(8, 512, 110), (3, 7, 5), (2, 40, 1000)]:
        x = torch.randn(M, b, n, generator=generator)
        live = (torch.rand(M, n, generator=generator) < 0.8).float()
        live[0, n // 2 :] = 0.0  # member 0: half its columns are padding
        x[1, :, 0] = -torch.inf
        k = torch.randint(0, n + 2, (M,), generator=generator)
        k[0] = n  # more than member 0's live entries: it keeps them all
        codes, mask = native.keep_largest(x, live, k)
        for m in range(M):
            candidates = torch.where(live[m] > 0, x[m], -torch.inf)
            want = min(int(k[m]), int((candidates[0] > -torch.inf).sum()))
            expected = torch.zeros(b, n)
            if want:
                expected.scatter_(-1, torch.topk(candidates, want).indices, 1.0)
            assert torch.equal(mask[m], expected), (M, b, n, m)
            assert torch.equal(codes[m], torch.where(expected > 0, x[m], 0.0)), (M, b, n, m)
    x = torch.tensor([[[1.0, torch.nan, 3.0, 2.0, 2.0, 2.0, -1.0]]])
    everywhere = torch.ones(1, 7)
    assert native.keep_largest(x, everywhere, torch.tensor([4]))[1].tolist() == [[[0, 1, 1, 1, 1, 0, 0]]]
    assert native.keep_largest(x, everywhere, torch.tensor([0]))[1].sum() == 0


def test_the_c_selections_built_without_avx512_are_the_same(three_threads, monkeypatch):
    """The AVX (and scalar) paths that a CPU without AVX-512 takes, built here with -mno-avx512f: the same checks."""
    assert native.available(), "the C kernels did not build (a compiler is on every machine we test on)"
    library = native.declared(ctypes.CDLL(str(native._build(native._compiler(), ("-mno-avx512f",)))))
    mkl = native._kernel()[1]
    monkeypatch.setattr(native, "_kernel", lambda: (library, mkl))
    check_topk_rows()
    check_keep_largest()


def test_the_c_sparse_backward_equals_the_torch_sparse_products(three_threads):
    """native.sparse_backward against the torch ops of kernels/sparse.py (sampled_addmm, the transposed pattern's
    CSR products, index_add): rows with no entries and entries at codes <= 0 (no gradient through them), augmented
    (strided) inputs, sizes that split members and column blocks unevenly over the threads, set and added to."""
    from sae_ensemble.kernels.patterns import transposed

    generator = torch.Generator().manual_seed(0)
    for M, b, n, o, d in [(5, 300, 97, 24, 24), (1, 7, 5, 3, 2), (3, 64, 200, 40, 17)]:
        counts = torch.randint(0, 6, (M * b,), generator=generator)
        counts[0] = 0
        crow = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        rows = torch.arange(M * b).repeat_interleave(counts)
        members = torch.div(rows, b, rounding_mode="floor")
        columns = members * n + torch.cat([torch.randperm(n, generator=generator)[:c] for c in counts.tolist()])
        values = torch.randn(rows.numel(), generator=generator).clamp(min=-0.2)  # some 0, some < 0
        g_xhat = torch.randn(M * b, o, generator=generator)
        D = torch.randn(M * n, o, generator=generator)
        x = torch.randn(M, b, d + 5, generator=generator)[..., :d]  # an augmented operand's first d columns
        l1 = torch.rand(M, generator=generator)

        pattern = torch.sparse_csr_tensor(crow, columns, values, size=(M * b, M * n))
        active = values > 0
        g_pre = (torch.sparse.sampled_addmm(pattern, g_xhat, D.T, beta=0.0).values() + l1[members]) * active
        by_column = transposed(rows, columns, M * b, M * n)
        want_D = torch.sparse.mm(by_column(values), g_xhat)
        want_W = torch.sparse.mm(by_column(g_pre), x.reshape(M * b, d))
        want_sum = torch.zeros(M * n).index_add_(0, columns, g_pre)
        want_fired = torch.zeros(M * n).index_add_(0, columns, active.float())

        g_pre_sum, fired = torch.zeros(M * n), torch.zeros(M * n)
        args = (crow, columns, values, g_xhat, D, x, l1, g_pre_sum, fired)
        g_D, g_W = native.sparse_backward(*args)
        for got, want in [(g_D, want_D), (g_W, want_W), (g_pre_sum, want_sum)]:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str((M, b, n, o, d)))
        assert torch.equal(fired, want_fired)
        added = native.sparse_backward(*args, totals=(g_D.clone(), g_W.clone()))  # a second chunk adds
        torch.testing.assert_close(added[0], 2 * want_D, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(added[1], 2 * want_W, rtol=1e-5, atol=1e-5)
        assert torch.equal(fired, 2 * want_fired)


def test_one_pass_adam_gives_the_torch_ops_numbers_bit_for_bit(three_threads):
    """kernels/native.py's C kernel against the torch ops it replaces, over sizes that split blocks,
    threads and members unevenly, and a chunk with a held-back member (that one runs the torch ops)."""
    assert native.available(), "the C kernel did not build (a compiler is on every machine we test on)"
    generator = torch.Generator().manual_seed(0)
    shapes = {"W_enc": (37, 129), "W_dec": (37, 129), "b_enc": (37,), "b_dec": (129,)}
    cases = [(3, [True] * 3, False), (40, [True] * 40, False), (5, [True, False, True, True, True], False)]
    cases += [(4, [True] * 4, True), (5, [True, True, False, True, True], True)]  # clipped: the factor in the pass
    for members, ok, clipped in cases:
        state = {name: torch.randn(members, *shape, generator=generator) for name, shape in shapes.items()}
        grads = {name: 0.01 * torch.randn_like(p) for name, p in state.items()}
        max_norm = torch.tensor([0.05, float("inf"), 1e-4, 100.0, 0.2][:members]) if clipped else None
        if clipped and not all(ok):
            grads["b_enc"][3, 5] = float("nan")  # its norm and clipping factor NaN: held back, nothing else touched
        mu = {name: 1e-3 * torch.randn_like(p) for name, p in state.items()}
        nu = {name: 1e-4 * torch.rand(p.shape, generator=generator) for name, p in state.items()}
        lr = torch.rand(members, generator=generator) * 1e-2
        results = []
        for one_pass in (True, False):
            copies = [{name: t.clone() for name, t in tensors.items()} for tensors in (state, mu, nu)]
            moments = adam.AdamState(copies[1], copies[2])
            taken = adam.step_(
                copies[0],
                grads,
                moments,
                torch.tensor(7.0),
                lr,
                torch.tensor(ok),
                check_on_host=True,
                one_pass=one_pass,
                max_grad_norm=max_norm,
            )
            results.append((copies, taken))
        (fast, fast_taken), (ops, ops_taken) = results
        assert torch.equal(fast_taken, ops_taken)
        if clipped and not all(ok):
            assert fast_taken.tolist() == [True, True, False, False, True]
            assert all(torch.equal(fast[0][name][3], state[name][3]) for name in shapes)
        for fast_tensors, ops_tensors in zip(fast, ops):
            for name in shapes:
                assert torch.equal(fast_tensors[name], ops_tensors[name]), f"{members} members: {name} differs"


def test_adam_on_the_stacked_tensors_is_torchopts_adam():
    """kernels/adam.py, every execution's optimizer, against the definition: torchopt's scale_by_adam, then
    p -= lr * direction, then unit-norm decoder rows; over several steps, with per-member learning rates."""
    generator = torch.Generator().manual_seed(3)
    shapes = {"W_enc": (6, 48, 24), "b_enc": (6, 48), "W_dec": (6, 48, 24), "b_dec": (6, 24)}
    params = {name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}
    lr = torch.rand(6, generator=generator) * 1e-2
    ours = {name: p.clone() for name, p in params.items()}
    mu, nu = ({name: torch.zeros_like(p) for name, p in params.items()} for _ in range(2))
    optimizer = torchopt.transform.scale_by_adam(b1=adam.BETAS[0], b2=adam.BETAS[1], eps=adam.EPS)
    state = optimizer.init(params)
    for step in range(1, 6):
        grads = {name: torch.randn(p.shape, generator=generator) for name, p in params.items()}
        directions, state = optimizer.update(grads, state)
        for name, p in params.items():
            p.sub_(lr.view(-1, *[1] * (p.dim() - 1)) * directions[name])
        params["W_dec"] = torch.nn.functional.normalize(params["W_dec"], dim=-1)
        taken = adam.step_(
            ours,
            grads,
            adam.AdamState(mu, nu),
            torch.tensor(float(step)),
            lr,
            torch.ones(6, dtype=torch.bool),
            check_on_host=True,
        )
        assert bool(taken.all())
    for name in shapes:
        torch.testing.assert_close(ours[name], params[name], atol=1e-6, rtol=1e-5, msg=name)


def special_values(t: torch.Tensor) -> torch.Tensor:
    """t with NaNs, -0.0 and exact zeros spread through it."""
    t.view(-1)[::97], t.view(-1)[::89], t.view(-1)[::83] = float("nan"), -0.0, 0.0
    return t


def assert_identical(got: torch.Tensor, want: torch.Tensor, what) -> None:
    """Equal bit for bit: the same NaNs, values and signs of zero."""
    assert torch.equal(got.isnan(), want.isnan()), what
    assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.signbit(), want.signbit()), what


RELU_SHAPES = [(1, 1, 1), (3, 7, 5), (5, 64, 513), (2, 300, 1100)]  # split column blocks and threads unevenly


@pytest.mark.parametrize("with_bias", [False, True])
def test_one_pass_relu_and_firing_counts_give_the_torch_ops_numbers(with_bias, three_threads):
    """kernels/native.py's relu_count_ against the bias add, ReLU, the 0/1 tile and the sums over rows,
    with NaNs, -0.0 and exact zeros among the pre-activations: bit for bit but for the order of the sums."""
    assert native.available(), "the C kernels did not build (a compiler is on every machine we test on)"
    generator = torch.Generator().manual_seed(0)
    for shape in RELU_SHAPES:
        pre = special_values(torch.randn(*shape, generator=generator))
        bias = torch.randn(shape[0], shape[2], generator=generator) if with_bias else None
        earlier = torch.randint(
            0, 50, (shape[0], shape[2]), generator=generator
        ).float()  # counts of earlier row chunks
        earlier_total = torch.randn(shape[0], shape[2], generator=generator)
        want = (pre + bias.unsqueeze(1) if with_bias else pre.clone()).relu_()
        want_fired = earlier + torch.gt(want, 0, out=torch.empty_like(want)).sum(1, dtype=torch.float32)
        codes, fired, total = pre.clone(), earlier.clone(), earlier_total.clone()
        native.relu_count_(codes, fired, bias, total)
        assert_identical(codes, want, shape)
        assert torch.equal(fired, want_fired), shape
        torch.testing.assert_close(total, earlier_total + want.sum(1), equal_nan=True, msg=str(shape))


def test_one_pass_relu_backward_gives_threshold_backward_numbers(three_threads):
    """relu_backward_ against the L1 term's add, threshold_backward on the codes and the sum over rows."""
    assert native.available(), "the C kernels did not build (a compiler is on every machine we test on)"
    generator = torch.Generator().manual_seed(1)
    for shape in RELU_SHAPES:
        codes = special_values(torch.randn(*shape, generator=generator)).relu()
        g = special_values(torch.randn(*shape, generator=generator))
        add = torch.rand(shape[0], generator=generator)
        earlier = torch.randn(shape[0], shape[2], generator=generator)
        want = torch.ops.aten.threshold_backward(g + add.view(-1, 1, 1), codes, 0.0)
        got, g_sum = g.clone(), earlier.clone()
        native.relu_backward_(got, codes, add, g_sum)
        assert_identical(got, want, shape)
        torch.testing.assert_close(g_sum, earlier + want.sum(1), equal_nan=True, msg=str(shape))


def test_one_pass_error_gives_the_torch_ops_numbers(three_threads):
    """error_pass_ against sub_, vecdot, mul_ and the sum over rows: bit for bit on the elements, the sums but for
    their order; the target also as a transcoder's, a column slice of the batch (rows further apart than o)."""
    assert native.available(), "the C kernels did not build (a compiler is on every machine we test on)"
    generator = torch.Generator().manual_seed(4)
    for (M, rows, o), sliced in [((1, 1, 1), False), ((3, 7, 5), True), ((5, 64, 129), False), ((2, 300, 40), True)]:
        x_hat = torch.randn(M, rows, o, generator=generator)
        special_values(x_hat[0])  # NaNs, -0.0 and zeros in the first member; the others' sums finite
        batch = torch.randn(rows, 2 * o + 3, generator=generator)
        target = batch[:, o + 3 :] if sliced else batch[:, :o].contiguous()
        squared, g_sum = torch.rand(M, generator=generator), torch.randn(M, o, generator=generator)
        err = x_hat - target
        want = err * 0.37
        got, got_squared, got_sum = x_hat.clone(), squared.clone(), g_sum.clone()
        native.error_pass_(got, target, 0.37, got_squared, got_sum)
        assert_identical(got, want, (M, rows, o))
        torch.testing.assert_close(
            got_squared, squared + torch.linalg.vecdot(err.flatten(1), err.flatten(1)), equal_nan=True
        )
        torch.testing.assert_close(got_sum, g_sum + want.sum(1), equal_nan=True)


def test_one_pass_normalisation_backward_equals_the_torch_ops(three_threads):
    """normalise_backward_ against vecdot, addcmul and div, on row lengths that split vector widths."""
    assert native.available(), "the C kernels did not build (a compiler is on every machine we test on)"
    generator = torch.Generator().manual_seed(2)
    for shape in [(1, 1, 1), (3, 5, 7), (4, 300, 129)]:
        rows = torch.randn(*shape, generator=generator)
        norms = rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        D, g = rows / norms, torch.randn(*shape, generator=generator)
        want = torch.addcmul(g, D, torch.linalg.vecdot(g, D).unsqueeze(-1), value=-1).div_(norms)
        got = g.clone()
        native.normalise_backward_(got, D, norms)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=str(shape))


@pytest.mark.parametrize("kernel", [dense, sparse], ids=["dense", "sparse"])
def test_kernel_gradients_and_stats_equal_reference_on_one_step(kernel):
    ensemble = train(TOPK, "reference", steps=5)
    with torch.no_grad():
        ensemble.params["b_enc"].normal_()  # non-zero encoder bias: the bias-decay gradient matters
    batch = sparse_batches(1, seed=3)[0]
    hparams = {**ensemble.hparams, "l1": ensemble.schedules(5)[1]}
    want_grads, want_aux = ensemble._reference(batch, hparams)
    grads, aux = kernel.grads(ensemble.params, hparams, batch, ensemble.layout, row_chunk=13)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    for name in want_aux:
        torch.testing.assert_close(aux[name], want_aux[name], atol=1e-5, rtol=1e-5, msg=name)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def test_bf16_dense_kernel_stays_within_bf16_rounding_of_the_float32_reference():
    """The bf16 path (CUDA's autocast choice) runs on CPU too, so CI checks its arithmetic."""
    ensemble = train(MIXED, "reference", steps=5)
    batch = sparse_batches(1, seed=3)[0]
    hparams = {**ensemble.hparams, "l1": ensemble.schedules(5)[1]}
    want_grads, want_aux = ensemble._reference(batch, hparams)
    for passes in ("augmented", "torch", "transposed"):  # eager CUDA's; compiled CUDA's default; feature-major tiles
        grads, aux = dense.grads(ensemble.params, hparams, batch, ensemble.layout, dtype=torch.bfloat16, passes=passes)
        for name in want_grads:  # bf16 keeps 8 mantissa bits: ~0.4% per rounding
            assert grads[name].dtype == torch.float32
            assert relative_error(grads[name], want_grads[name]) < 3e-2, (passes, name)
        for name in ("loss", "mse", "l1_norm"):
            assert relative_error(aux[name], want_aux[name]) < 1e-2, (passes, name)
        assert relative_error(aux["fired"], want_aux["fired"]) < 3e-2, passes  # bf16 rounding flips codes near 0


@pytest.mark.parametrize("execution", ["reference", "fused"])
def test_micro_batches_equal_the_whole_batch(execution, reference_mixed):
    assert_same_members(train(MIXED, execution, micro_batches=3), reference_mixed)


def test_diverging_member_is_frozen_on_the_fused_path_and_others_are_unchanged():
    healthy = MIXED[:3]
    diverging = Member("relu", D_IN, 32, l1=1e-3, lr=1e30, seed=7)
    with_bad = train([*healthy, diverging], "fused", steps=20)
    without = train(healthy, "fused", steps=20)
    assert with_bad.alive.tolist() == [True, True, True, False]
    for name, tensor in with_bad.params.items():
        assert torch.isfinite(tensor[3]).all(), name
    for index in range(3):
        a, _ = with_bad.member_state(index)
        b, _ = without.member_state(index)
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_autotune_keeps_a_measured_candidate_and_trains_like_the_reference(reference_mixed):
    """Where a kernel implements every member, the reference (which never won against one) is not timed."""
    tuned = Ensemble(MIXED, total_steps=STEPS, execution="auto")
    choice = tuned.autotune(sparse_batches(1)[0])
    candidates = {c.split("(")[0] for c in tuned.autotune_report}
    assert choice.describe() in tuned.autotune_report and "fused" in candidates and "reference" not in candidates
    assert tuned.execution == choice and choice.kind == "fused"
    for batch in sparse_batches(STEPS):
        tuned.step(batch)
    assert_same_members(tuned, reference_mixed)


def test_autotune_falls_back_to_the_reference_where_every_kernel_runs_out_of_memory():
    tuned = Ensemble(TOPK, total_steps=1, execution="auto")
    grads = tuned.grads

    def kernels_out_of_memory(batch, hparams, execution=None):
        if execution is not None and execution.kind != "reference":
            raise torch.OutOfMemoryError(f"{execution.describe()} does not fit")
        return grads(batch, hparams, execution)

    tuned.grads = kernels_out_of_memory
    assert tuned.autotune(sparse_batches(1)[0]).kind == "reference"
    assert set(tuned.autotune_report) == {"reference"}


def test_sparse_is_a_candidate_for_topk_ensembles_and_for_others_only_when_codes_are_sparse():
    tuned = Ensemble(TOPK, total_steps=1, execution="auto")
    tuned.autotune(sparse_batches(1)[0])
    assert any(c.startswith("sparse") for c in tuned.autotune_report)
    dense_codes = [Member("relu", D_IN, 48, l1=1e-6, seed=0)]  # at init about half the features fire
    tuned = Ensemble(dense_codes, total_steps=1, execution="auto")
    tuned.autotune(sparse_batches(1)[0] - 0.3)
    assert not any(c.startswith("sparse") for c in tuned.autotune_report)
    with pytest.raises(
        ValueError, match="training.execution='vectorised' is unknown; allowed: auto, reference, fused, sparse"
    ):
        Ensemble(MIXED, total_steps=1, execution="vectorised")


def test_topk_keeps_exactly_k_when_pre_activations_tie():
    member = Member("topk", 8, 16, k=3, seed=0)
    ensemble = Ensemble([member], total_steps=1, execution="fused")
    with torch.no_grad():
        ensemble.params["W_enc"].fill_(1.0)  # every feature gets the same pre-activation
    codes, _ = ensemble.forward(torch.ones(5, 8))
    assert ((codes > 0).sum(-1) == 3).all()
    _, aux = ensemble.grads(torch.ones(5, 8), ensemble.hparams)
    assert torch.equal(aux["l0"], torch.tensor([3.0]))


def cuda(test):
    """A CUDA test: part of `make gpu-check` (-m cuda), skipped without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@cuda
@pytest.mark.parametrize(
    "execution,members",
    [("fused", MIXED), ("sparse", TOPK), ("sparse", AUXK)],
    ids=["fused", "sparse", "sparse-auxk (all columns)"],
)
def test_cuda_kernels_equal_the_cpu_reference(execution, members):
    """On CUDA in full fp32 (TF32 off): the kernels' members equal the CPU reference's to 1e-4 after 50 steps."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        on_gpu = Ensemble(members, total_steps=STEPS, device="cuda", execution=execution)
        for batch in sparse_batches(STEPS):
            on_gpu.step(batch.cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert_same_members(on_gpu, train(members, "reference"), atol=1e-4)


@cuda
def test_cuda_autotune_picks_a_measured_candidate_equal_to_the_reference():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        tuned = Ensemble(TOPK, total_steps=STEPS, device="cuda", execution="auto")
        for batch in sparse_batches(STEPS):
            tuned.step(batch.cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert {"fused(rows=64)", "sparse(rows=64)"} == set(tuned.autotune_report)
    assert_same_members(tuned, train(TOPK, "reference"), atol=1e-4)


@pytest.mark.parametrize("execution", ["reference", "fused"])
def test_a_non_finite_step_is_skipped_and_freezes_only_after_freeze_after_in_a_row(execution):
    members = MIXED[:3]
    batches = sparse_batches(12)
    ensembles = {}
    for name in ("reference", execution):
        ensemble = Ensemble(members, total_steps=12, execution=name, freeze_after=3)
        for step, batch in enumerate(batches):
            poisoned = step in (4, 5) or step >= 8  # member 1: two bad steps, then four in a row
            ensemble.hparams["l1"][1] = float("nan") if poisoned else members[1].l1
            before = {k: v[1].clone() for k, v in ensemble.params.items()}
            moments = {k: v[1].clone() for k, v in ensemble.opt_state.mu.items()}
            ensemble.step(batch)
            if poisoned:  # the step is skipped: params and moments exactly as before
                assert all(torch.equal(ensemble.params[k][1], before[k]) for k in before)
                assert all(torch.equal(ensemble.opt_state.mu[k][1], moments[k]) for k in moments)
            if step == 7:
                assert ensemble.alive.tolist() == [True, True, True], "two skipped steps must not freeze"
        assert ensemble.alive.tolist() == [True, False, True]
        ensembles[name] = ensemble
    assert_same_members(ensembles[execution], ensembles["reference"])


@cuda
@pytest.mark.parametrize("compile", [False, True], ids=["eager-augmented", "compiled-at-d-columns"])
def test_cuda_bf16_autocast_fused_step_matches_the_reference_autocast_step(compile):
    ensemble = Ensemble(MIXED, total_steps=STEPS, device="cuda", autocast_bf16=True, execution="fused", compile=compile)
    batch = sparse_batches(1, seed=3)[0].cuda()
    hparams = {**ensemble.hparams}
    fused_grads, _ = ensemble.grads(batch, hparams)
    reference_grads, _ = ensemble.grads(batch, hparams, Execution("reference"))
    for name in reference_grads:
        assert relative_error(fused_grads[name], reference_grads[name]) < 3e-2, name
    losses = [float(ensemble.step(b.cuda())["loss"].sum()) for b in sparse_batches(STEPS)]
    assert bool(ensemble.alive.all()) and losses[-1] < 0.5 * losses[0]


@cuda
def test_cuda_graph_replay_of_the_fused_step_equals_eager_steps():
    runs = {}
    for graphs in (True, False):
        ensemble = Ensemble(
            MIXED, total_steps=STEPS, device="cuda", execution="fused", cuda_graphs=graphs, freeze_after=3
        )
        for batch in sparse_batches(STEPS):
            stats = ensemble.step(batch.cuda())
        runs[graphs] = ensemble
        assert ensemble.graph_captured == graphs and ensemble.cuda_graphs == graphs
    assert_same_members(runs[True], runs[False], atol=1e-6)
    assert int(runs[True]._device_step) == STEPS
    assert torch.isfinite(stats["loss"]).all()


@pytest.mark.parametrize("passes", [None, "transposed"], ids=["at-d-columns", "feature-major"])
def test_compiled_kernels_train_like_the_eager_kernels(reference_mixed, passes):
    """torch.compile (training.compile, CUDA workers) changes the code that runs, never the result, in
    either GEMM layout the autotuner times. Inductor's CPU backend compiles here, so CI checks the
    compiled arithmetic."""
    compiled = Ensemble(MIXED, total_steps=STEPS, execution=Execution("fused", passes=passes), compile=True)
    for batch in sparse_batches(STEPS):
        compiled.step(batch)
    assert_same_members(compiled, reference_mixed)


def test_autotune_of_a_compiled_ensemble_times_both_gemm_layouts():
    """Compiled, the fused kernel's passes fuse either way, so which tile layout is faster (row-major, or
    feature-major for K-major weight-gradient GEMMs) is the device's to say: both are candidates."""
    tuned = Ensemble(MIXED, total_steps=STEPS, execution="auto", compile=True)
    batch = sparse_batches(1)[0]
    tuned.autotune(batch)
    rows = batch.shape[0]
    assert {f"fused(rows={rows}{passes})" for passes in ("", ", transposed")} <= set(tuned.autotune_report)
    assert tuned.choice in tuned.autotune_report


@cuda
@pytest.mark.parametrize("passes", [None, "transposed"], ids=["at-d-columns", "feature-major"])
def test_cuda_compiled_graphed_step_equals_the_cpu_reference(reference_mixed, passes):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        on_gpu = Ensemble(
            MIXED, total_steps=STEPS, device="cuda", execution=Execution("fused", passes=passes), compile=True
        )
        for batch in sparse_batches(STEPS):
            on_gpu.step(batch.cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert on_gpu.graph_captured
    assert_same_members(on_gpu, reference_mixed, atol=1e-4)


def test_native_kernels_off_runs_the_torch_ops_and_trains_like_the_reference(reference_mixed):
    """training.native_kernels=off (a worker calls native.use): no C kernel runs, the numbers stay the reference's."""
    native.use("off")
    try:
        assert not native.available() and dense.default_passes("cpu") == "augmented"
        assert_same_members(train(MIXED, "fused"), reference_mixed)
    finally:
        native.use("auto")


def test_native_kernels_on_is_refused_before_any_work_where_they_cannot_build(monkeypatch):
    from sae_ensemble import pipeline
    from sae_ensemble.config import ConfigError
    from tests.sweeps import compose_config

    monkeypatch.setattr(native, "_prerequisites", lambda: False)
    with pytest.raises(ConfigError, match="training.native_kernels=on needs Linux, a C compiler"):
        pipeline.validate(compose_config("training.native_kernels=on", "devices=cpu"))
    pipeline.validate(compose_config("training.native_kernels=auto", "devices=cpu"))  # auto falls back to torch ops
    with pytest.raises(ValueError, match="training.native_kernels='sometimes' is unknown"):
        native.use("sometimes")
