"""Untrusted checkpoints, two runs on one folder, a full disk (issue 19).

Each case checks the exit status, the one line on stderr, no traceback, and that nothing
written earlier was lost. Most run the scripts' ``main`` in-process with a fault injected;
the lock test needs a second process.
"""

import errno
import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from ltm_pyro import files
from ltm_pyro.checkpoint import (
    FORMAT,
    VERSION,
    load_checkpoint,
    model_from_checkpoint,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from ltm_pyro.errors import UsageError
from ltm_pyro.explore import load_run
from ltm_pyro.files import WriteFailed, append_jsonl, folder_lock, read_jsonl, write_json

from .conftest import REPO

# One worker runs this module under pytest-xdist, so its module-scoped trained run is built once.
pytestmark = pytest.mark.xdist_group("test_checkpoint_safety")

RUN = ["--seq-len", "32", "--batch-size", "4", "--inference-steps", "2", "--eval-every", "2",
       "--eval-windows", "4", "--checkpoint-every", "2", "--max-steps", "6", "--no-progress"]
_SCRIPTS: dict = {}


def _script(name: str):
    if name not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(name[:-3], REPO / "experiments" / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[name] = module
    return _SCRIPTS[name]


def call(capsys, monkeypatch, script: str, *args: str) -> tuple[int, list[str]]:
    """Run a script's main in-process as the command line would: (exit status, stderr lines)."""
    module = _script(script)
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        module.run_main(module.main)
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    return exited.value.code, stderr.strip().splitlines()


def _metrics(out):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"}
            for r in read_jsonl(out / "metrics.jsonl")]


def _snapshot(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: what every interrupted-then-resumed run below must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    module = _script("run_svi.py")
    argv = sys.argv
    sys.argv = ["run_svi.py", "--out", str(out), *RUN]
    try:
        with pytest.raises(SystemExit) as exited:
            module.run_main(module.main)
    finally:
        sys.argv = argv
    assert exited.value.code == 0
    return out


# 1. Checkpoints hold only tensors and plain data; anything else is refused unexecuted.

def test_checkpoint_loads_with_weights_only_and_holds_no_pickled_objects(reference):
    raw = torch.load(reference / "checkpoint.pt", weights_only=True)
    assert raw["format"] == FORMAT and raw["version"] == VERSION
    assert isinstance(raw["tokenizer"], str) and json.loads(raw["tokenizer"])["kind"] == "word"
    assert isinstance(raw["rng"]["python"]["keys"], torch.Tensor)
    assert isinstance(raw["rng"]["numpy"]["keys"], torch.Tensor)
    payload = load_checkpoint(reference)
    assert isinstance(payload["tokenizer"], dict)
    model_from_checkpoint(payload)


def test_rng_states_round_trip_through_a_saved_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.normal()  # cached Gaussians are part of the state
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_states(generator)})

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.normal(), float(torch.rand(1)),
                float(torch.rand(1, generator=generator)))

    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9), generator.manual_seed(9)
    restore_rng_states(load_checkpoint(tmp_path / "c.pt")["rng"], generator)
    assert draws() == expected


class _Payload:
    """Unpickling this runs ``call(*args)``: what a malicious checkpoint would do."""

    def __init__(self, call, *args) -> None:  # noqa: ANN001
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _malicious(path, marker, kind: str):
    shell = _Payload(os.system, f"touch {marker}")
    code = _Payload(exec, f"open({str(marker)!r}, 'w').close()")
    payload = {
        "current": {"format": FORMAT, "version": VERSION, "config": {}, "x": shell},
        "claims-v1": {"format": FORMAT, "version": 1, "x": code},
        "bare": code,
    }[kind]
    torch.save(payload, path)


@pytest.mark.parametrize("kind,words", [
    ("current", "refused to load"), ("claims-v1", "old pickle format"), ("bare", "refused")])
def test_malicious_pickle_is_refused_by_every_reader_without_running(
        tmp_path, capsys, monkeypatch, kind, words):
    folder = tmp_path / "shared-run"
    folder.mkdir()
    marker = tmp_path / "marker"
    _malicious(folder / "checkpoint.pt", marker, kind)
    before = _snapshot(folder)
    with pytest.raises(UsageError) as refused:
        load_checkpoint(folder)
    assert words in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(UsageError):
        load_run(folder)
    for script, args in (("evaluate.py", ["--checkpoint", folder]),
                         ("generate.py", ["--checkpoint", folder, "--prompt", "the"]),
                         ("run_svi.py", ["--out", folder, *RUN])):
        status, lines = call(capsys, monkeypatch, script, *args)
        assert status == 2 and len(lines) == 1 and words in lines[0], (script, lines)
    assert not marker.exists()
    assert _snapshot(folder) == before
    # The file is genuinely malicious: a plain unpickle would have run it.
    torch.load(folder / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def _as_pickle_format(source, path):
    """``source``'s checkpoint re-saved exactly as format version 1 wrote it."""
    payload = load_checkpoint(source)
    payload.pop("format"), payload.pop("version")
    random.seed(11), np.random.seed(12)
    payload["rng"] = {**payload["rng"], "python": random.getstate(),
                      "numpy": np.random.get_state()}
    torch.save({"format": FORMAT, "version": 1, **payload}, path)
    return payload


def test_old_pickle_format_gets_one_line_and_a_converter_run_knowingly(
        reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "old-run"
    out.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (out / name).write_bytes((reference / name).read_bytes())
    old = _as_pickle_format(reference, out / "checkpoint.pt")
    before = _snapshot(out)
    for script, args in (("run_svi.py", ["--out", out, *RUN]),
                         ("evaluate.py", ["--checkpoint", out])):
        status, lines = call(capsys, monkeypatch, script, *args)
        assert status == 2 and len(lines) == 1, lines
        assert "old pickle format" in lines[0] and "--i-trust-this-file" in lines[0]
    status, lines = call(capsys, monkeypatch, "convert_checkpoint.py", "--checkpoint", out)
    assert status == 2 and len(lines) == 1 and "--i-trust-this-file" in lines[0]
    assert _snapshot(out) == before

    status, _ = call(capsys, monkeypatch, "convert_checkpoint.py", "--checkpoint", out,
                     "--i-trust-this-file")
    assert status == 0
    new = load_checkpoint(out)
    assert new["version"] == VERSION and new["step"] == old["step"]
    assert all(torch.equal(new["decoder"][k], v) for k, v in old["decoder"].items())
    generator = torch.Generator()
    restore_rng_states(new["rng"], generator)
    assert random.getstate() == old["rng"]["python"]
    assert np.array_equal(np.random.get_state()[1], old["rng"]["numpy"][1])
    status, lines = call(capsys, monkeypatch, "run_svi.py", "--out", out, *RUN)
    assert status == 0, lines
    assert _metrics(out) == _metrics(reference)
    assert not list(out.glob(".*.tmp"))


# 2. One training process per run folder.

def test_run_on_a_locked_folder_exits_at_once_and_readers_still_read(
        reference, tmp_path, capsys, monkeypatch):
    before = _snapshot(reference)
    with folder_lock(reference):
        holder = json.loads((reference / ".lock").read_text())
        assert holder == {"pid": os.getpid(), "host": socket.gethostname()}
        started = time.perf_counter()
        status, lines = call(capsys, monkeypatch, "run_svi.py", "--out", reference, *RUN,
                             "--force")
        assert time.perf_counter() - started < 5
        assert status == 2 and len(lines) == 1, lines
        assert "in use by another training run" in lines[0]
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in lines[0]
        status, lines = call(capsys, monkeypatch, "evaluate.py", "--checkpoint", reference,
                             "--max-windows", "4", "--iw-samples", "2", "--elbo-samples", "1",
                             "--batch-size", "4", "--no-progress")
        assert status == 0, lines
    assert _snapshot(reference) == before
    assert (reference / ".lock").read_text() == ""  # released and emptied
    with folder_lock(reference):  # nobody holds it now
        pass


def test_lock_is_released_when_a_run_fails(reference, tmp_path, capsys, monkeypatch):
    status, lines = call(capsys, monkeypatch, "run_svi.py", "--out", reference, *RUN,
                         "--d-model", "48")
    assert status == 2 and "different config" in lines[0]
    with folder_lock(reference):
        pass


@pytest.mark.slow
def test_second_process_on_a_training_folder_exits_and_the_first_is_untouched(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, str(REPO / "experiments" / "run_svi.py"), "--out", str(out),
            *RUN[:-3], "--max-steps", "400", "--no-progress"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoint.pt").exists():
            assert first.poll() is None, first.stderr.read().decode()
            assert time.time() < deadline
            time.sleep(0.05)
        log_before = (out / "metrics.jsonl").read_text()
        started = time.perf_counter()
        second = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert time.perf_counter() - started < 60
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert "Traceback" not in second.stderr
        assert f"pid {first.pid} on host {socket.gethostname()}" in lines[0]
        assert first.poll() is None  # still training
        assert (out / "metrics.jsonl").read_text().startswith(log_before)  # not rewritten
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with folder_lock(out):  # the kernel dropped the killed run's lock
        pass
    assert load_checkpoint(out)["step"] >= 2


# 3. Full disk and I/O errors: one line, the last good checkpoint intact and resumable.

def _fail_on_call(number: int, code: int, write_some):  # noqa: ANN001
    """A replacement that lets ``number - 1`` calls through, then writes a little and fails."""
    calls = {"n": 0}

    def wrap(real):  # noqa: ANN001
        def failing(*args, **kwargs):  # noqa: ANN002, ANN003
            calls["n"] += 1
            if calls["n"] == number:
                write_some(*args, **kwargs)
                raise OSError(code, os.strerror(code))
            return real(*args, **kwargs)
        return failing
    return wrap


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_checkpoint_write_failure_keeps_the_last_checkpoint_and_resumes(
        reference, tmp_path, capsys, monkeypatch, code):
    out = tmp_path / "run"
    half = _fail_on_call(2, code, lambda payload, handle: handle.write(b"PK\x03\x04" * 1000))
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", half(torch.save))
        status, lines = call(capsys, monkeypatch, "run_svi.py", "--out", out, *RUN)
    assert status == 2 and len(lines) == 1, lines
    assert f"could not write {out / 'checkpoint.pt'}: {os.strerror(code)}" in lines[0]
    assert "rerun the same command to resume from the checkpoint of step 2" in lines[0]
    assert load_checkpoint(out)["step"] == 2
    assert not list(out.glob(".*.tmp"))
    status, lines = call(capsys, monkeypatch, "run_svi.py", "--out", out, *RUN)
    assert status == 0, lines
    assert _metrics(out) == _metrics(reference)
    a, b = load_checkpoint(out)["decoder"], load_checkpoint(reference)["decoder"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_log_append_failure_leaves_no_torn_line_and_resumes(
        reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    torn = _fail_on_call(2, errno.EIO, lambda fd, data: os.write(fd, bytes(data)[:10]))
    with monkeypatch.context() as patch:  # the 2nd record: step 4's validation line
        patch.setattr(files, "_write_all", torn(files._write_all))
        status, lines = call(capsys, monkeypatch, "run_svi.py", "--out", out, *RUN)
    assert status == 2 and len(lines) == 1, lines
    assert f"could not write {out / 'metrics.jsonl'}: Input/output error" in lines[0]
    assert "resume from the checkpoint of step 2" in lines[0]
    log = (out / "metrics.jsonl").read_text()
    assert log.endswith("\n") and all(json.loads(line) for line in log.splitlines())
    assert [r["step"] for r in _metrics(out)] == [2]
    with open(out / "metrics.jsonl", "a") as handle:  # a crash mid-append, not cut back
        handle.write('{"split": "train", "st')
    status, lines = call(capsys, monkeypatch, "run_svi.py", "--out", out, *RUN)
    assert status == 0, lines
    assert _metrics(out) == _metrics(reference)


def test_results_write_failure_is_one_line_and_a_rerun_finishes(
        reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    full = _fail_on_call(1, errno.ENOSPC, lambda figure, tmp, **_: tmp.write_bytes(b"\x89PNG"))
    with monkeypatch.context() as patch:  # the training curves, written after the last step
        patch.setattr(Figure, "savefig", full(Figure.savefig))
        status, lines = call(capsys, monkeypatch, "run_svi.py", "--out", out, *RUN)
    assert status == 2 and len(lines) == 1, lines
    assert "training_curves.png: No space left on device; free some disk space" in lines[0]
    assert load_checkpoint(out)["step"] == 6 and _metrics(out) == _metrics(reference)
    status, lines = call(capsys, monkeypatch, "run_svi.py", "--out", out, *RUN)
    assert status == 0 and (out / "training_curves.png").is_file()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_failed_writes_keep_the_previous_file(tmp_path, monkeypatch, code):
    write_json(tmp_path / "results.json", {"old": 1})
    append_jsonl(tmp_path / "log.jsonl", {"step": 1})
    save_checkpoint(tmp_path / "c.pt", {"step": 1})
    with monkeypatch.context() as patch:
        patch.setattr(files.os, "fsync", _fail_on_call(1, code, lambda fd: None)(os.fsync))
        with pytest.raises(WriteFailed) as failed:
            write_json(tmp_path / "results.json", {"new": 2})
    with monkeypatch.context() as patch:
        patch.setattr(files, "_write_all", _fail_on_call(1, code, lambda fd, data: os.write(
            fd, data[:3]))(files._write_all))
        with pytest.raises(WriteFailed):
            append_jsonl(tmp_path / "log.jsonl", {"step": 2})
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", _fail_on_call(1, code, lambda p, h: h.write(b"x"))(
            torch.save))
        with pytest.raises(WriteFailed):
            save_checkpoint(tmp_path / "c.pt", {"step": 2})
    message = str(failed.value)
    assert "\n" not in message and os.strerror(code) in message
    assert ("free some disk space" in message) == (code == errno.ENOSPC)
    assert json.loads((tmp_path / "results.json").read_text()) == {"old": 1}
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 1}\n'
    assert load_checkpoint(tmp_path / "c.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "log.jsonl", "results.json"]

