"""glibc thresholds: large temporaries stop costing page faults once raised (counted, not timed)."""
import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
import torch
torch.set_num_threads(1)
if sys.argv[1] == "raise":
    from distill.codec.malloc_tuning import raise_glibc_thresholds
    assert raise_glibc_thresholds()
from distill.codec.quantizer import MultiCodebookQuantizer
x = np.random.default_rng(0).standard_normal((2048, 64)).astype(np.float32)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# 16 codebooks: the search's beam accumulators are ~8 MB per 64-row chunk, far above the 128 KiB mmap threshold
# that MALLOC_TRIM_THRESHOLD_ (set by Dask's nanny for its workers) freezes
q = MultiCodebookQuantizer.train(x, num_codebooks=16, seed=0, progress=False, lsq_iters=1)
codes = q.encode(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0, q.quantizer_id, codes.sum())
"""


def _run(mode: str) -> tuple[int, str, str]:
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}  # a Dask worker's environment
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    faults, qid, checksum = out.stdout.split()
    return int(faults), qid, checksum


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_raised_thresholds_cut_page_faults_and_change_nothing():
    (f_default, id_default, sum_default), (f_raised, id_raised, sum_raised) = _run("default"), _run("raise")
    assert (id_raised, sum_raised) == (id_default, sum_default)  # same quantizer, same codes
    assert f_raised * 3 < f_default, (f_raised, f_default)  # measured 14x fewer minor faults


def test_train_quantizer_command_gives_the_library_result(tmp_path):
    import numpy as np
    from click.testing import CliRunner

    from cli.main import main as cli
    from distill.codec.quantizer import MultiCodebookQuantizer

    x = np.random.default_rng(0).standard_normal((600, 16)).astype(np.float32)
    np.save(tmp_path / "f.npy", x)
    res = CliRunner().invoke(cli, ["train-quantizer", str(tmp_path / "f.npy"), "--num-codebooks", "2", "--out",
                                   str(tmp_path / "q.safetensors"), "--held-out", "0"])
    assert res.exit_code == 0, res.output
    q = MultiCodebookQuantizer.load(str(tmp_path / "q.safetensors"))
    ref = MultiCodebookQuantizer.train(x, num_codebooks=2, seed=0, progress=False)
    assert q.quantizer_id == ref.quantizer_id
