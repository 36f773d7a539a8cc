"""scripts/peer_flash_attn.py's own pieces, without flash-attn's suite: the sample is deterministic and covers every
test function, the suite's patches change what they say, the table counts right, and the flash_attn shim maps
flash-attn's names to flashlm's and its padding and rotary helpers match independent references."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from compare import assert_close, assert_equal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import peer_flash_attn  # noqa: E402


def _ids():
    """A suite in miniature: one big function, two small ones."""
    return ([f"t.py::test_big[{i}]" for i in range(500)] + [f"t.py::test_small[{i}]" for i in range(3)]
            + ["t.py::test_one"])


def test_sample_is_deterministic_and_covers_every_function():
    ids = _ids()
    a = peer_flash_attn.sample_cases(ids, 40, seed=0)
    assert a == peer_flash_attn.sample_cases(list(ids), 40, seed=0)
    assert a != peer_flash_attn.sample_cases(ids, 40, seed=1)
    assert len(a) == len(set(a)) == 40
    assert a == [i for i in ids if i in set(a)], "the sample keeps the suite's order"
    functions = [peer_flash_attn.function_of(i) for i in a]
    assert functions.count("test_small") == 3 and functions.count("test_one") == 1
    assert peer_flash_attn.sample_cases(ids, 10_000, seed=0) == ids


def test_sample_smaller_than_the_number_of_functions():
    ids = _ids()
    got = peer_flash_attn.sample_cases(ids, 2, seed=3)
    assert len(got) == 2 and set(got) <= set(ids)


def test_function_of_strips_path_and_parameters():
    assert peer_flash_attn.function_of("dir/t.py::test_x[1-True-dtype0]") == "test_x"
    assert peer_flash_attn.function_of("t.py::test_y") == "test_y"


def test_patches_change_what_they_name_and_count_it():
    source = "\n".join([
        'is_sm80 = torch.cuda.get_device_capability("cuda") == (8, 0)',
        'if torch.cuda.get_device_properties("cuda").total_memory <= 16 * 2**30: pass',
        'device = "cuda"', "x = torch.randn(2, device='cuda')",
        '@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])',
        '@pytest.mark.parametrize("dtype", [torch.float16])',
        "y = x.to(torch.float16)",
    ])
    patches = peer_flash_attn.suite_patches(64 * 2**30)
    got, counts = peer_flash_attn.patch_suite(source, patches)
    assert counts == [1, 1, 2, 1, 2]
    assert "cuda" not in got and "float16" not in got.replace("bfloat16", "")
    assert "is_sm80 = (8, 0) == (8, 0)" in got and str(64 * 2**30) in got
    assert '[torch.bfloat16])' in got and 'device = "cpu"' in got and 'device="cpu"' in got


def test_features_select_cases_and_reject_unknown_names():
    assert peer_flash_attn.parse_features("alibi,leftpad") == ["alibi", "leftpad"]
    with pytest.raises(ValueError, match="--features"):
        peer_flash_attn.parse_features("alibi,bogus")
    assert peer_flash_attn.wants({"alibi": False}, [])
    assert peer_flash_attn.wants({"alibi": True, "dropout_p": 0.0}, ["alibi"])
    assert peer_flash_attn.wants({"dropout_p": 0.17}, ["alibi", "dropout"])
    assert not peer_flash_attn.wants({"alibi": False, "dropout_p": 0.0, "has_leftpad": False},
                                     ["alibi", "dropout", "leftpad"])


def test_table_counts_by_function_and_groups_failures_without_their_numbers():
    results = {
        "a1": {"function": "test_a", "outcome": "passed"},
        "a2": {"function": "test_a", "outcome": "failed", "error": "ValueError", "message": "seq_lens[0] = 3 < 5"},
        "b1": {"function": "test_b", "outcome": "failed", "error": "ValueError", "message": "seq_lens[1] = 7 < 9"},
        "b2": {"function": "test_b", "outcome": "skipped", "reason": "too big"},
        "b3": {"function": "test_b", "outcome": "not run"},
    }
    text = peer_flash_attn.table(results)
    assert "| test_a | 2 | 1 | 1 | 0 |" in text
    assert "| test_b | 2 | 0 | 1 | 1 |" in text
    assert "| **total** | 4 | 1 | 2 | 1 |" in text
    assert "- 2 x `ValueError: seq_lens[#] = # < #` (test_a 1, test_b 1)" in text
    assert "- 1 x `too big` (test_b 1)" in text and "1 sampled cases did not run" in text


@pytest.fixture
def shim(monkeypatch):
    """`import flash_attn` finds the shim for this test only."""
    monkeypatch.syspath_prepend(peer_flash_attn.SHIM)
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        del sys.modules[name]


def test_shim_maps_flash_attn_names_to_flashlm(shim):
    import flash_attn
    import flash_attn.flash_attn_interface as interface

    import flashlm.flash_attn_interface as ours

    assert flash_attn.__file__.startswith(peer_flash_attn.SHIM)
    for name in ours.__all__:
        assert getattr(flash_attn, name) is getattr(ours, name), name
        assert getattr(interface, name) is getattr(ours, name), name
    assert interface.USE_TRITON_ROCM is False
    assert interface._get_block_size_n is ours._get_block_size_n


def test_shim_padding_round_trips_and_matches_a_loop(shim):
    from flash_attn.bert_padding import pad_input, unpad_input

    torch.manual_seed(0)
    x = torch.randn(3, 5, 2, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    tokens, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask)
    want = torch.cat([x[b][mask[b]] for b in range(3)])
    assert_equal(tokens, want, name="tokens")
    assert cu_seqlens.tolist() == [0, 3, 3, 8] and cu_seqlens.dtype == torch.int32
    assert max_seqlen == 5 and seqused.tolist() == [3, 0, 5]
    back = pad_input(tokens, indices, 3, 5)
    assert_equal(back, torch.where(mask[:, :, None, None], x.detach(), 0.0), name="padded")
    back.sum().backward()
    assert_equal(x.grad, mask[:, :, None, None].expand_as(x).float(), name="grad")


@pytest.mark.parametrize("interleaved", [False, True])
def test_shim_rotary_matches_complex_rotation(shim, interleaved):
    from flash_attn.layers.rotary import apply_rotary_emb

    torch.manual_seed(0)
    batch, seqlen, heads, dim, rotary_dim = 2, 6, 3, 16, 8
    x = torch.randn(batch, seqlen, heads, dim, dtype=torch.float64)
    angle = torch.rand(20, rotary_dim // 2, dtype=torch.float64) * 2 * math.pi
    offsets = torch.tensor([0, 7], dtype=torch.int32)
    got = apply_rotary_emb(x, angle.cos(), angle.sin(), interleaved=interleaved, seqlen_offsets=offsets)
    # Reference: each rotated channel pair as a complex number, times e^(i * angle of its position).
    rot = x[..., :rotary_dim]
    pairs = (rot.reshape(*rot.shape[:-1], -1, 2) if interleaved
             else torch.stack(rot.split(rotary_dim // 2, dim=-1), dim=-1))
    z = torch.view_as_complex(pairs.contiguous())
    positions = torch.arange(seqlen)[None, :] + offsets[:, None].long()
    rotated = torch.view_as_real(z * torch.polar(torch.ones_like(angle[positions]), angle[positions])[:, :, None, :])
    want_rot = rotated.flatten(-2) if interleaved else torch.cat(rotated.unbind(-1), dim=-1)
    want = torch.cat([want_rot, x[..., rotary_dim:]], dim=-1)
    assert_close(got, want, atol=1e-12, name="rotated")


MINI_SUITE = '''
import os
import time

import pytest
import torch
from flash_attn import flash_attn_func

memory = torch.cuda.get_device_properties("cuda").total_memory


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_attention(causal, dtype):
    device = "cuda"
    assert dtype == torch.bfloat16 and memory == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    q = torch.randn(1, 3, 2, 8, device=device, dtype=dtype)
    assert flash_attn_func(q, q, q, causal=causal).shape == q.shape


def test_raises():
    raise ValueError("bad value 17")


def test_skips():
    pytest.skip("not here")


def test_slow():
    time.sleep(120)
'''


def test_runner_on_a_miniature_suite(tmp_path):
    suite = tmp_path / "test_mini.py"
    suite.write_text(MINI_SUITE)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "peer_flash_attn.py"), "--tests", str(suite),
                           "--sample", "5", "--timeout", "10", "--json", str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "out.json").read_text())
    outcomes = {nodeid.split("::")[-1]: r["outcome"] for nodeid, r in results.items()}
    assert outcomes == {"test_attention[False-dtype0]": "passed", "test_attention[True-dtype0]": "passed",
                        "test_raises": "failed", "test_skips": "skipped", "test_slow": "failed"}, proc.stdout
    assert "| **total** | 5 | 2 | 2 | 1 |" in proc.stdout
    assert "- 1 x `ValueError: bad value #` (test_raises 1)" in proc.stdout
    assert "- 1 x `CaseTimeout: the case ran past # s` (test_slow 1)" in proc.stdout
    assert 'device "cuda" -> "cpu": 1' in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--features", "alibi,bogus"], "--features: unknown"),
    (["--sample", "0"], "--sample: must be at least 1"),
    (["--tests", "/nonexistent/test_flash_attn.py"], "No such file"),
])
def test_runner_rejects_bad_arguments(tmp_path, args, message):
    suite = tmp_path / "test_mini.py"
    suite.write_text("def test_one():\n    pass\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "peer_flash_attn.py"), "--tests", str(suite),
                           *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "peer_flash_attn: error:" in proc.stderr and message in proc.stderr, proc.stderr
