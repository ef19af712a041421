"""Bad input raises ValueError/TypeError naming the argument (the systematic fuzz is in test_fuzz.py)."""

import warnings

import numpy as np
import pytest
import torch

import nystrom
from nystrom.linalg.tokens import detect_high_norm_tokens

rng = np.random.default_rng(0)
Q = rng.standard_normal((2, 10, 4))
K = rng.standard_normal((2, 10, 4))
V = rng.standard_normal((2, 10, 3))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(Q=Q[0, 0]), ValueError, "Q must have shape"),
        (dict(K=K[:, :7]), ValueError, "K and V must have the same number of tokens"),
        (dict(K=K[..., :3]), ValueError, "Q and K must have the same feature size"),
        (dict(V=V[:1]), ValueError,
         r"Q, K, V must have the same leading \(batch/head\) dimensions, got \(2,\), \(2,\), \(1,\)"),
        (dict(Q=Q.astype(np.int64)), TypeError, "Q must have dtype float16, bfloat16, float32 or float64"),
        (dict(V=V.astype(np.complex128)), TypeError, "V must have dtype float16, bfloat16, float32 or float64"),
        # Non-native byte order and longdouble compare unequal to float64: they were computed in float32 (review).
        (dict(Q=Q.astype(">f8"), K=K.astype(">f8"), V=V.astype(">f8")), TypeError, "native byte order, got dtype"),
        (dict(Q=Q.astype(np.longdouble), K=K.astype(np.longdouble), V=V.astype(np.longdouble)), TypeError,
         "Q must have dtype float16, bfloat16, float32 or float64"),
        (dict(K=K.astype(np.float32)), TypeError, "Q, K, V must share one dtype, got float64, float32, float64"),
        (dict(Q=np.where(np.arange(4) == 2, np.nan, Q)), ValueError, "Q contains NaN"),
        (dict(V=np.where(np.arange(3) == 1, np.inf, V)), ValueError, "V contains NaN or infinite"),
        (dict(Q=Q[:, :0]), ValueError, "Q must have at least one token"),
        (dict(Q=Q.tolist()), TypeError, "Q must be an array of an array-API library"),
        # None where an array is required: AttributeError or IndexError from inside the checks (review).
        (dict(Q=None), TypeError, "Q must be an array of an array-API library .* got None"),
        (dict(K=None), TypeError, "K must be an array of an array-API library .* got None"),
        (dict(V=None), TypeError, "V must be an array of an array-API library .* got None"),
        # enable_gqa repeated the heads before any check: AttributeError and ZeroDivisionError (review).
        (dict(Q=Q[None].tolist(), enable_gqa=True), TypeError, "Q must be an array of an array-API library"),
        (dict(K=None, enable_gqa=True), TypeError, "K must be an array .* got None"),
        (dict(Q=Q[None], K=K[None, :0], V=V[None, :0], enable_gqa=True), ValueError,
         r"enable_gqa=True needs .* as many key as value heads, at least one"),
        (dict(K=torch.from_numpy(K)), TypeError, "K is a torch array but Q is a numpy array"),
        # numpy's masked arrays passed as arrays: Q failed in a broadcast deep inside, a mask's own mask was ignored.
        (dict(Q=np.ma.masked_array(Q)), TypeError, r"Q is a numpy masked array.*\(Q.filled"),
        (dict(attn_mask=np.ma.masked_array(np.ones((2, 1, 10), bool), mask=np.arange(20).reshape(2, 1, 10) >= 18)),
         TypeError,
         "attn_mask is a numpy masked array"),
        (dict(num_landmarks=0), ValueError, "num_landmarks must be at least 1"),
        (dict(num_landmarks=-3), ValueError, "num_landmarks must be at least 1"),
        (dict(num_landmarks=11), ValueError, "num_landmarks must be at most the number of keys n=10"),
        (dict(num_landmarks=4.0), TypeError, "num_landmarks must be an int >= 1"),
        (dict(num_landmarks=True), TypeError, "num_landmarks must be an int"),
        (dict(strategy="farthest"), ValueError, "unknown strategy 'farthest'; candidates are:\n  'fps': "),
        (dict(solver="svd"), ValueError, "unknown solver 'svd'; candidates are:\n  'newton_schulz': "),
        (dict(solver="solve"), ValueError, "(?s)unknown solver 'solve'; candidates are:.*'ridge': "),
        (dict(strategy=3), TypeError, "strategy must be"),
        # A class is callable too: it was called with the call's arguments as its options.
        (dict(strategy=nystrom.FPS), TypeError, r"strategy must be a Strategy object, not the class: pass FPS\(\)"),
        (dict(solver=nystrom.PInv), TypeError, r"solver must be a Solver object, not the class: pass PInv\(\)"),
        # Swapped (a review: each failed later with an error about neither argument).
        (dict(strategy=nystrom.PInv()), TypeError, r"strategy must be a Strategy object or a name, got the solver "
                                                   r"PInv\(.*\): pass it as solver="),
        (dict(solver=nystrom.KMeans()), TypeError, r"solver must be a Solver object or a name, got the strategy "
                                                   r"KMeans\(.*\): pass it as strategy="),
        (dict(scale=-1.0), ValueError, "scale must be a finite positive"),
        (dict(scale="big"), TypeError, "scale must be a real number"),
        (dict(seed=-1), ValueError, "seed must be at least 0"),
        (dict(seed=1.5), TypeError, "seed must be None or an int >= 0"),
        (dict(attn_mask=np.ones((2, 10), np.complex64)), TypeError, "attn_mask must be a bool mask"),
        (dict(attn_mask=np.ones((2, 9), bool)), ValueError, "attn_mask must have shape"),
        (dict(attn_mask=np.zeros((2, 10), bool)), ValueError, "attn_mask masks every key"),
        (dict(attn_mask=np.arange(10)[None].repeat(2, 0) < 3, num_landmarks=4), ValueError,
         "num_landmarks=4 exceeds the 3 real keys"),
        (dict(attn_mask=np.full((2, 10), 2)), ValueError, "attn_mask as an integer mask must hold 0"),
        (dict(attn_mask=np.full((2, 1, 10), -1.0)), ValueError, "attn_mask as an additive float mask"),
        (dict(attn_mask=np.tril(np.ones((10, 10), bool))), ValueError, "attn_mask differs between queries"),
        (dict(key_padding_mask=np.ones((2, 10), bool)), TypeError, "attn_mask=~key_padding_mask"),
        (dict(attention_mask=np.ones((2, 10), int)), TypeError, "attn_mask=attention_mask"),
        (dict(is_causal=True), ValueError, "is_causal=True is not supported. Nyström attention here is bidirectional"),
        (dict(dropout_p=0.1), ValueError, "dropout_p must be 0"),
        (dict(mask=np.ones(10, bool)), TypeError, "unexpected keyword argument 'mask'"),
        (dict(return_info=1), TypeError, "return_info must be a bool"),
        (dict(query_chunk_size=0), ValueError, "query_chunk_size must be at least 1"),
        (dict(query_chunk_size=2.0), TypeError, "query_chunk_size must be None or an int"),
        (dict(features=np.ones((2, 9, 5))), ValueError, "features must have shape"),
        # torch.compile hands the seed to its draw operator as a 64-bit signed integer: a larger one ran eagerly only.
        (dict(seed=2**63, strategy="uniform"), ValueError, r"seed must be below 2\*\*63"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(Q=Q, K=K, V=V, num_landmarks=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        nystrom.approximate(args.pop("Q"), args.pop("K"), args.pop("V"), **args)


def test_none_where_an_array_is_required_is_named():
    # AttributeError from inside the checks before (review).
    with pytest.raises(TypeError, match="V must be an array .* got None"):
        nystrom.exact_attention(Q, K, None)
    with pytest.raises(TypeError, match="approx must be an array .* got None"):
        nystrom.estimate_relative_error(Q, K, V, None)



def test_tensor_layouts_the_library_cannot_compute_on_are_named():
    # Sparse, nested and float8 inputs failed deep inside (NotImplementedError / RuntimeError from gather, expand,
    # reshape or a comparison), meta tensors in Tensor.item() (review).
    q, k, v = (torch.from_numpy(x) for x in (Q, K, V))
    with pytest.raises(TypeError, match="Q must be a dense .strided. tensor, got layout torch.sparse_coo"):
        nystrom.approximate(q.to_sparse(), k, v, num_landmarks=4)
    with pytest.raises(TypeError, match="attn_mask must be a dense .strided. tensor"):
        nystrom.approximate(q, k, v, attn_mask=torch.ones(2, 10, dtype=torch.bool).to_sparse(), num_landmarks=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: nested tensors are a prototype
        nested = torch.nested.nested_tensor([q[0], q[1, :5]])
    with pytest.raises(TypeError, match="Q must be a dense .strided. tensor, got a nested tensor"):
        nystrom.exact_attention(nested, k, v)
    with pytest.raises(TypeError, match="attn_mask must be a bool mask"):
        nystrom.approximate(q, k, v, attn_mask=torch.zeros(2, 10).to(torch.float8_e4m3fn), num_landmarks=4)
    meta = [x.to("meta") for x in (q, k, v)]
    with pytest.raises(ValueError, match="meta device, whose tensors hold no values to check: pass check_values=False"):
        nystrom.approximate(*meta, num_landmarks=4)
    assert nystrom.approximate(*meta, num_landmarks=4, check_values=False).shape == (2, 10, 3)

def test_landmark_counts_and_dtypes_that_do_not_fit_are_named():
    # Cross-attention: m landmark queries are means or picks of the n_q queries.
    with pytest.raises(ValueError, match="num_landmarks=4 exceeds the number of queries n_q=3"):
        nystrom.approximate(Q[:, :3], K, V, num_landmarks=4)
    landmarks = nystrom.Landmarks(Q[:, :4].astype(np.float32), K[:, :4].astype(np.float32))
    with pytest.raises(TypeError, match="landmark queries must have the dtype of K, float64, got float32"):
        nystrom.linalg.nystrom_attention(Q, K, V, landmarks)


@pytest.mark.parametrize("mask,error,match", [
    (np.ones((2, 10), np.float32), TypeError, "attention_mask must be bool or integer 0/1"),
    (np.ones((2, 9), bool), ValueError, r"attention_mask must have shape \(2, 10\)"),
    (np.full((2, 10), 2), ValueError, "integer mask must hold 0 .padding. and 1"),
    (np.zeros((2, 10), bool), ValueError, "masks every token of at least one sequence"),
], ids=["float", "shape", "integer 2", "all padding"])
def test_token_masks_of_the_detectors_are_checked(mask, error, match):
    hidden = rng.standard_normal((2, 10, 8))
    with pytest.raises(error, match=match):
        detect_high_norm_tokens(hidden, attention_mask=mask)


def test_numpy_bools_are_bools():
    # numpy 2 names np.bool_ "bool": refusing it read "return_info must be a bool, got bool".
    out, info = nystrom.approximate(Q, K, V, num_landmarks=4, return_info=np.True_, check_values=np.True_)
    assert info.landmarks.keys.shape[-2] == 4
    nystrom.approximate(Q, K, V, num_landmarks=4, tol=0.5, strict_tol=np.False_)


def test_per_key_mask_of_4d_inputs_needs_the_query_axis():
    # (B, H, n) was the former per-head form; as SDPA broadcasts it, H would be the query axis.
    q = rng.standard_normal((2, 3, 10, 4))
    with pytest.raises(ValueError, match=r"mask\[\.\.\., None, :\]"):
        nystrom.approximate(q, q, q, num_landmarks=4, attn_mask=np.ones((2, 3, 10), bool))


def test_strategy_returning_wrong_shape_is_caught():
    def bad(Q, K, m, **kw):
        return nystrom.Landmarks(Q[..., :m + 1, :], K[..., :m + 1, :])

    with pytest.raises(ValueError, match="landmark queries have shape"):
        nystrom.approximate(Q, K, V, strategy=bad, num_landmarks=4)


def test_long_half_precision_inputs_pass_the_finite_check():
    # 560,000 ones sum to far more than float16's largest value (65,504): the check sums in float32
    # (pytest turns the overflow RuntimeWarning of a float16 sum into an error).
    Q = np.ones((8, 70_000, 1), dtype=np.float16)
    assert nystrom.approximate(Q, Q, Q, strategy="uniform", num_landmarks=4, seed=0).dtype == np.float16


def test_candidate_lists_read_as_plain_whole_sentences():
    # The message of an unknown name lists each candidate with its docstring's summary: it was the first line, which
    # stopped mid-sentence ("... Padded tokens are") and showed raw LaTeX ("V \Sigma_r^{-1} U^\top") (review).
    for registry, resolve in ((nystrom.linalg.landmarks.STRATEGIES, nystrom.get_strategy),
                              (nystrom.linalg.solvers.SOLVERS, nystrom.get_solver)):
        with pytest.raises(ValueError) as err:
            resolve("no such name")
        lines = str(err.value).splitlines()[1:]
        assert len(lines) == len(registry)
        for line in lines:
            assert line.endswith(".") and "\\" not in line and "`" not in line and ":math:" not in line, line


def test_the_non_finite_error_survives_pickling_and_a_rebuild_from_its_message():
    # Built from the input's name, it came back from pickle (or a DataLoader worker's re-raise, which passes the whole
    # message) as "<message> contains NaN or infinite values" (a review).
    import pickle

    from nystrom.linalg.validation import NonFiniteError, check_finite

    with pytest.raises(NonFiniteError) as raised:
        check_finite(np, Q=np.array([1.0, np.nan]))
    assert raised.value.name == "Q" and str(raised.value) == "Q contains NaN or infinite values"
    again = pickle.loads(pickle.dumps(raised.value))
    assert type(again) is NonFiniteError and str(again) == "Q contains NaN or infinite values"
    assert str(NonFiniteError("Caught it in a worker: Q contains NaN")) == "Caught it in a worker: Q contains NaN"
