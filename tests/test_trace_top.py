"""scripts/trace_top.py on a synthetic trace: per-kernel sums over the device streams only, and
the --hlo table that groups a kernel's per-layer copies by HLO instruction."""

import gzip
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HLO = """HloModule jit_step
%gemm_fusion_dot.1_computation (p0: bf16[4,8]) -> bf16[8,8] {
  ROOT %dot.1 = bf16[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={0}
}
ENTRY %main {
  %gemm_fusion_dot.1 = bf16[8,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion_dot.1_computation, metadata={op_name="jit(step)/transpose(jvp())/dot_general"}
  %gemm_fusion_dot.2 = bf16[8,8]{1,0} fusion(%a, %c), kind=kCustom, calls=%gemm_fusion_dot.1_computation, metadata={op_name="jit(step)/transpose(jvp())/dot_general"}
  ROOT %custom-call.3 = (f32[8,16]{1,0}, s8[64]{0}) custom-call(%a, %d), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/jvp()/dot_general"}
}
"""


def test_kernel_sums_and_hlo_groups(tmp_path):
    ev = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #13"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}}]
    for name, dur in (("gemm_fusion_dot.1", 300.0), ("gemm_fusion_dot.2", 100.0),
                      ("custom-call.3", 50.0)):
        ev.append({"ph": "X", "pid": 1, "tid": 7, "name": name, "dur": dur, "ts": 0,
                   "args": {"hlo_op": name}})
        ev.append({"ph": "X", "pid": 1, "tid": 8, "name": name, "dur": dur, "ts": 0})  # a copy
    trace = tmp_path / "t.trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    hlo = tmp_path / "m.txt"
    hlo.write_text(HLO)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "trace_top.py"),
                          str(trace), "--steps", "1", "--hlo", str(hlo)],
                         capture_output=True, text=True, check=True).stdout
    assert "0.45 ms of device kernels per step, 3 launches" in out  # streams only, no copies
    rows = [l for l in out.splitlines() if l.startswith("| 0.")]
    # the two per-layer gemm fusions become one row of 0.4 ms, 2 launches, with their HLO facts
    assert ("| 0.400 | 2 | `gemm_fusion_dot` | fusion:kCustom | `bf16[8,8]{1,0}` "
            "| `jit(step)/transpose(jvp())/dot_general` |") in rows
    assert any("`custom-call` | custom-call:__cublas$lt$matmul" in l and "0.050 | 1" in l
               for l in rows)
