"""One import namespace: the wheel owns `baton` and nothing else, so a venv that already holds
Hugging Face's `kernels` (the name our kernels/ folder once installed under) runs Baton as it is
installed, not editable; and the gateway process never loads torch."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from stack import Stack

import baton

REPO = Path(__file__).resolve().parents[1]
HF_KERNELS = "kernels==0.19.1"  # Hugging Face's package of that name


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the tree (a build leaves files where it runs)."""
    src = tmp_path_factory.mktemp("src") / "baton"
    skip = (".git", ".venv", "logs", "build", "*.egg-info", "__pycache__", "results", ".*cache")
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*skip))
    out = src.parent / "dist"
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)]
    subprocess.run(pip, check=True)
    return next(out.glob("baton_serve-*.whl"))


def test_the_wheel_holds_baton_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"baton", "baton_serve-0.1.0.dist-info"}
    for folder in ("gateway", "prefill", "decode", "kvtransfer", "kernels", "benchmarks"):
        assert f"baton/{folder}/__init__.py" in names  # each folder, under the namespace
    assert {"baton/kernels/csrc/paged_decode.c", "baton/kernels/csrc/common.h"} <= set(names)
    templates = {f"baton/gateway/templates/{t}.jinja" for t in ("hermes", "mistral", "llama3_json")}
    assert templates <= set(names)  # --chat-template NAME reads them from the package


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    """A new venv holding Hugging Face's `kernels`, then our wheel (not editable). The
    dependencies (torch, transformers, ...) come from this test's environment through a path
    entry, so nothing large installs twice; a path entry runs no .pth file, so this checkout's
    editable install is not seen there."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    site = next((root / "lib").glob("python3*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps"]
    subprocess.run([*pip, HF_KERNELS], check=True)
    subprocess.run([*pip, str(wheel)], check=True)
    return root


def test_installed_beside_hugging_face_kernels_the_offline_api_generates(venv, tiny_llama):
    probe = f"""
import json, kernels, baton
assert hasattr(kernels, "get_kernel"), kernels.__file__  # Hugging Face's, not ours
out = baton.LLM({str(tiny_llama)!r}, dtype="float32").generate(
    [[1, 5, 9, 200]], baton.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
print(json.dumps([baton.__file__, out[0].outputs[0].token_ids]))
"""
    run = subprocess.run(  # cwd: away from this checkout, whose folders would shadow the venv's
        [str(venv / "bin" / "python"), "-c", probe],
        cwd=venv, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    where, tokens = json.loads(run.stdout.splitlines()[-1])
    assert where.startswith(str(venv))  # the installed wheel served it
    want = baton.LLM(str(tiny_llama), dtype="float32").generate(
        [[1, 5, 9, 200]], baton.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    )
    assert tokens == want[0].outputs[0].token_ids


def torch_mapped(pid: int) -> bool:
    """Whether the process has torch's library mapped (importing torch maps it)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_installed_beside_hugging_face_kernels_baton_up_serves(venv, tiny_text_model, tmp_path):
    # from the checkout's root, as `make up` runs it: its top-level kernels/ must not shadow
    # Hugging Face's in any process `baton up` starts (they run `python -P`)
    stack = Stack(tmp_path / "logs", tiny_text_model, python=str(venv / "bin" / "python"), cwd=REPO)
    try:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
        r = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        # the gateway and the `baton up` parent stay light; a service does load torch
        assert not torch_mapped(stack.pid("gateway"))
        assert not torch_mapped(stack.proc.pid)
        assert torch_mapped(stack.pid("decode-0"))
    finally:
        stack.stop()
