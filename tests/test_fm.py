"""The FM term against a brute-force double loop over field pairs, and the model's assembly."""

import pytest
import torch
from torchrec import KeyedJaggedTensor

from deepfm_dist.model import DeepFM, fm_second_order, init_table_block, one_hot_features, table_dim


def brute_force_fm(fields: torch.Tensor) -> torch.Tensor:
    """sum_{i<j} <v_i, v_j> with two explicit loops. fields: [B, F, D] -> [B]."""
    b, f, _ = fields.shape
    out = torch.zeros(b, dtype=fields.dtype)
    for i in range(f):
        for j in range(i + 1, f):
            out += (fields[:, i] * fields[:, j]).sum(-1)
    return out


def test_fm_matches_double_loop():
    g = torch.Generator().manual_seed(0)
    for b, f, d in [(5, 2, 1), (7, 39, 16), (3, 10, 7)]:
        fields = torch.randn(b, f, d, generator=g, dtype=torch.float64)
        torch.testing.assert_close(fm_second_order(fields), brute_force_fm(fields))


def test_fm_gradient_matches_double_loop():
    """The analytic backward (d/dv_i = s - v_i) against autograd through the double loop."""
    g = torch.Generator().manual_seed(1)
    fields = torch.randn(6, 9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(6, generator=g, dtype=torch.float64)
    (fm_second_order(fields) * weights).sum().backward()
    ours = fields.grad.clone()
    fields.grad = None
    (brute_force_fm(fields) * weights).sum().backward()
    torch.testing.assert_close(ours, fields.grad)
    assert torch.autograd.gradcheck(fm_second_order, (fields.detach().requires_grad_(),))


def test_onednn_linear_matches_nn_linear():
    """model.linear_kernel=onednn: same state dict, values and gradients as nn.Linear (fp32,
    summation order only)."""
    from deepfm_dist.model.deepfm import DeepTower
    from deepfm_dist.model.linear import OneDNNLinear, onednn_available

    torch.manual_seed(0)
    plain = DeepTower(24, [16, 8], "relu", True, 0.0, linear_kernel="torch")
    fast = DeepTower(24, [16, 8], "relu", True, 0.0, linear_kernel="onednn")
    fast.load_state_dict(plain.state_dict())
    assert list(fast.state_dict()) == list(plain.state_dict())
    kinds = {type(m) for m in fast.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == ({OneDNNLinear} if onednn_available() else {torch.nn.Linear})
    x = torch.randn(32, 24)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = plain(xa), fast(xb)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-4)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_fm_is_not_the_flattened_scalar_interaction():
    # torchrec's FactorizationMachine sums over pairs of scalars of the flattened input, which
    # also pairs coordinates inside one field; ours must not.
    fields = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])  # one non-zero field: no pair of fields
    assert fm_second_order(fields).item() == 0.0
    flat = fields.flatten(1)
    scalar_pairs = 0.5 * (flat.sum(1) ** 2 - (flat**2).sum(1))
    assert scalar_pairs.item() == 2.0


def test_table_dim_has_room_for_first_order_and_is_multiple_of_4():
    for d in range(1, 40):
        t = table_dim(d)
        assert t % 4 == 0 and t >= d + 1 and t - (d + 1) < 4


def test_init_block_is_independent_of_how_the_table_is_cut():
    kw = dict(seed=3, table="t_C1", vector_dim=5, table_dim=8, std=0.1)
    rows = 70_000  # spans two RNG blocks
    full = init_table_block(rows=(0, rows), cols=(0, 8), **kw)
    assert torch.all(full[:, 5:] == 0), "first-order and padding columns start at 0"
    pieces = torch.cat(
        [
            torch.cat([init_table_block(rows=(r0, r1), cols=(0, 4), **kw), init_table_block(rows=(r0, r1), cols=(4, 8), **kw)], 1)
            for r0, r1 in [(0, 12_345), (12_345, 65_536), (65_536, rows)]
        ]
    )
    torch.testing.assert_close(pieces, full, rtol=0, atol=0)
    other = init_table_block(rows=(0, 10), cols=(0, 8), **{**kw, "seed": 4})
    assert not torch.equal(other, full[:10])


def test_deepfm_logit_is_bias_plus_first_order_plus_fm_plus_mlp():
    torch.manual_seed(0)
    features, sizes, d = ["a", "b"], {"a": 6, "b": 4}, 3
    model = DeepFM(features=one_hot_features(features, sizes), num_dense=2, embedding_dim=d, mlp=[4],
                   batch_norm=False, table_device="cpu").eval()
    with torch.no_grad():
        for f in features:
            model.sparse_fields.ebc.embedding_bags[f"t_{f}"].weight.normal_()
        model.dense_fields.weights.normal_()
        model.bias.fill_(0.3)
    dense = torch.tensor([[0.5, 2.0], [1.0, 0.0]])
    # row 0: a=[1], b=[2, 3] (multi-hot, summed); row 1: a=[5], b=[] (empty bag -> zeros)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=features, values=torch.tensor([1, 5, 2, 3]), lengths=torch.tensor([1, 1, 2, 0])
    )
    logits = model(dense, kjt)

    wa = model.sparse_fields.ebc.embedding_bags["t_a"].weight
    wb = model.sparse_fields.ebc.embedding_bags["t_b"].weight
    rows_a = torch.stack([wa[1], wa[5]])
    rows_b = torch.stack([wb[2] + wb[3], torch.zeros(table_dim(d))])
    dense_vecs = dense.unsqueeze(-1) * model.dense_fields.vectors
    fields = torch.cat([dense_vecs, rows_a[:, None, :d], rows_b[:, None, :d]], 1)
    first = rows_a[:, d] + rows_b[:, d] + dense @ model.dense_fields.weights
    expected = 0.3 + first + brute_force_fm(fields) + model.deep(fields.flatten(1))
    torch.testing.assert_close(logits, expected)


def test_onednn_linear_bf16_autocast_matches_torch_autocast_and_fp32():
    """train.precision=bf16 on CPU: the oneDNN layers run bf16 matmuls (inputs rounded to bf16,
    fp32 accumulation) exactly where torch's autocast runs nn.Linear in bf16, so the two towers
    agree to summation order; both stay within bf16 rounding of the fp32 tower. Weights and
    their gradients stay fp32; outside autocast the same module is fp32 again."""
    from deepfm_dist.model.deepfm import DeepTower
    from deepfm_dist.model.linear import onednn_available

    if not (onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("this CPU has no native bf16 for oneDNN")

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    def run(tower, x, bf16):
        x = x.clone().requires_grad_()
        tower.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = tower(x)
        assert y.dtype == (torch.bfloat16 if bf16 else torch.float32)
        y.float().square().sum().backward()
        assert x.grad.dtype == torch.float32
        return y.float(), x.grad, {n: p.grad.clone() for n, p in tower.named_parameters()}

    x = torch.randn(256, 64)
    for batch_norm in (True, False):
        torch.manual_seed(0)
        ours = DeepTower(64, [48, 32], "relu", batch_norm, 0.0, linear_kernel="onednn")
        plain = DeepTower(64, [48, 32], "relu", batch_norm, 0.0, linear_kernel="torch")
        plain.load_state_dict(ours.state_dict())
        y, dx, grads = run(ours, x, bf16=True)
        y_t, dx_t, grads_t = run(plain, x, bf16=True)
        assert rel(y, y_t) < 1e-3 and rel(dx, dx_t) < 1e-3
        for name, p in ours.named_parameters():
            assert p.dtype == torch.float32 and grads[name].dtype == torch.float32, name
            assert rel(grads[name], grads_t[name]) < 1e-3, name
        y32, dx32, grads32 = run(ours, x, bf16=False)
        # The bf16 run is really bf16 (not fp32 in disguise), and near fp32: 8 significant bits,
        # ~0.4% per rounding on the way forward; the backward rounds every layer's gradient to
        # bf16 and its sums cancel (BatchNorm's mean subtractions most), so norm-wise ~10% there,
        # as in torch's own autocast above. A wrong transpose or cast would be off by ~100%.
        assert not torch.equal(y, y32)
        assert rel(y, y32) < 0.02
        assert rel(dx, dx32) < 0.25
        # All parameter gradients as one vector: a Linear bias right before BatchNorm has an
        # exactly-zero gradient, which fp32 leaves at 1e-7 and bf16 at 1e-3, no relative scale.
        flat, flat32 = (torch.cat([g[n].flatten() for n in grads]) for g in (grads, grads32))
        assert rel(flat, flat32) < 0.25


def test_bf16_on_a_cpu_without_native_bf16_names_the_key(monkeypatch):
    from deepfm_dist.step import check_precision

    check_precision("fp32", "cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match=r"train\.precision='bf16'.*AVX512-BF16"):
        check_precision("bf16", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    check_precision("bf16", "cuda")  # the CPU's check does not apply to a GPU rank


@pytest.mark.parametrize("per_field_copies", [True, False], ids=["cpu_copies", "gpu_index_select"])
def test_field_interactions_equal_the_unfused_composition(per_field_copies, monkeypatch):
    """The fused node (field assembly + first order + FM term over sparse and dense fields)
    against the composition it replaces: to_dict, stack, slices, cat, ``x_i * e_i``, ``x . w``
    and the brute-force FM double loop. Keys in another order than the fields (as after
    sharding), two collections (plain + weighted), with and without dense fields. The MLP input
    [x | sparse fields] is bit for bit the same, the wide term and every gradient (rows, dense
    values, vectors, weights) equal to float64 rounding, and padding columns get a zero
    gradient. Both forms: per-field copies (CPU) and index_select / index_copy_ (GPU), here
    both on CPU tensors."""
    from torchrec import KeyedTensor

    from deepfm_dist.model import fields as fields_module
    from deepfm_dist.model.fields import field_interactions

    monkeypatch.setattr(fields_module, "PER_FIELD_COPIES_ON", ("cpu",) if per_field_copies else ())

    g = torch.Generator().manual_seed(3)
    b, d, w = 6, 5, 8
    features = ["a", "b", "c", "d", "e"]
    f64 = dict(generator=g, dtype=torch.float64)
    close = dict(rtol=1e-12, atol=1e-12)
    for split, second, nd in [(["c", "a", "e", "b", "d"], None, 0), (["d", "b"], ["e", "a", "c"], 0),
                              (["b", "c", "a", "e", "d"], None, 3), (["d", "b"], ["e", "a", "c"], 2)]:
        groups = [split] if second is None else [split, second]
        vals = [torch.randn(b, len(keys) * w, **f64, requires_grad=True) for keys in groups]
        dense_args = []
        if nd:
            dense_args = [torch.randn(b, nd, **f64, requires_grad=True), torch.randn(nd, d, **f64, requires_grad=True),
                          torch.randn(nd, **f64, requires_grad=True)]
        kts = [KeyedTensor(keys=keys, length_per_key=[w] * len(keys), values=v) for keys, v in zip(groups, vals)]
        mlp_in, wide = field_interactions(kts, features, d, *dense_args)

        by_name = {}
        for kt in kts:
            by_name.update(kt.to_dict())
        rows = torch.stack([by_name[f] for f in features], dim=1)
        ref_fields, ref_wide = rows[:, :, :d], rows[:, :, d].sum(dim=1)
        ref_mlp_in = ref_fields.flatten(1)
        if nd:
            x, vectors, weights = dense_args
            ref_mlp_in = torch.cat([x, ref_mlp_in], dim=1)
            ref_fields = torch.cat([x.unsqueeze(-1) * vectors, ref_fields], dim=1)
            ref_wide = ref_wide + x @ weights
        ref_wide = ref_wide + brute_force_fm(ref_fields)
        assert mlp_in.is_contiguous() and mlp_in.shape == (b, nd + len(features) * d)
        assert torch.equal(mlp_in, ref_mlp_in)
        torch.testing.assert_close(wide, ref_wide, **close)

        gm = torch.randn(mlp_in.shape, **f64)
        gw = torch.randn(b, **f64)
        leaves = vals + dense_args
        ours = torch.autograd.grad((mlp_in * gm).sum() + (wide * gw).sum(), leaves)
        ref = torch.autograd.grad((ref_mlp_in * gm).sum() + (ref_wide * gw).sum(), leaves, retain_graph=True)
        for x_, y_ in zip(ours, ref):
            torch.testing.assert_close(x_, y_, **close)
        for v in ours[: len(vals)]:
            assert torch.count_nonzero(v.view(b, -1, w)[:, :, d + 1:]) == 0, "padding columns get no gradient"
        # Only the wide term used (no MLP), and only the MLP input used (no FM).
        only_wide = torch.autograd.grad(field_interactions(kts, features, d, *dense_args)[1].sum(), vals[0])[0]
        torch.testing.assert_close(only_wide, torch.autograd.grad(ref_wide.sum(), vals[0], retain_graph=True)[0], **close)
        only_mlp = torch.autograd.grad(field_interactions(kts, features, d, *dense_args)[0].sum(), vals[0])[0]
        torch.testing.assert_close(only_mlp, torch.autograd.grad(ref_mlp_in.sum(), vals[0])[0], rtol=0, atol=0)


def test_field_interactions_gradcheck():
    from torchrec import KeyedTensor

    from deepfm_dist.model.fields import field_interactions

    g = torch.Generator().manual_seed(5)
    vals = torch.randn(3, 2 * 4, generator=g, dtype=torch.float64, requires_grad=True)
    x, vec, wts = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True) for shape in [(3, 2), (2, 3), (2,)])

    def f(vals, x, vec, wts):
        kt = KeyedTensor(keys=["b", "a"], length_per_key=[4, 4], values=vals)
        return field_interactions([kt], ["a", "b"], 3, x, vec, wts)

    assert torch.autograd.gradcheck(f, (vals, x, vec, wts))


@pytest.mark.parametrize("kernel,dtype", [("torch", torch.float64), ("auto", torch.float32)], ids=["float64", "onednn_fp32"])
def test_deep_tower_with_dense_fields_folded_equals_the_full_input(kernel, dtype):
    """DeepTower(x_eff, e) with the dense fields folded into the first layer against the same
    tower on the full input [x_1 e_1 | .. | x_Nd e_Nd | other fields]: output and the
    gradients of every parameter, of e and of the inputs equal to float64 rounding (and to fp32
    rounding on the oneDNN kernel)."""
    from deepfm_dist.model.deepfm import DeepTower

    torch.manual_seed(2)
    b, nd, ns, d = 64, 3, 4, 5
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    tower = DeepTower((nd + ns) * d, [8, 6], "relu", batch_norm=True, dropout=0.0, linear_kernel=kernel).to(dtype)
    x = torch.randn(b, nd, dtype=dtype, requires_grad=True)
    e = torch.randn(nd, d, dtype=dtype, requires_grad=True)
    other = torch.randn(b, ns * d, dtype=dtype, requires_grad=True)
    full = torch.cat([(x.unsqueeze(-1) * e).flatten(1), other], dim=1)
    folded_out = tower(torch.cat([x, other], dim=1), e)
    full_out = tower(full)
    torch.testing.assert_close(folded_out, full_out, **tol)
    gy = torch.randn(b, dtype=dtype)
    leaves = [x, e, other, *tower.parameters()]
    for a, c in zip(torch.autograd.grad((folded_out * gy).sum(), leaves), torch.autograd.grad((full_out * gy).sum(), leaves)):
        torch.testing.assert_close(a, c, **tol)


def test_field_interactions_reject_keys_that_are_not_the_fields():
    from torchrec import KeyedTensor

    from deepfm_dist.model.fields import field_interactions

    kt = KeyedTensor(keys=["a", "x"], length_per_key=[4, 4], values=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="keys"):
        field_interactions([kt], ["a", "b"], 3)
